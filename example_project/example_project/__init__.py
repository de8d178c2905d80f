"""Example Scrapy project that crawls the fault site with scrapy-resilience."""
