"""Pure resilience logic (backoff, header parsing, classification), with no Scrapy imports."""
