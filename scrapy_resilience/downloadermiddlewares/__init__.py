"""Downloader middlewares of scrapy-resilience."""
