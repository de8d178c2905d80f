"""Extensions of scrapy-resilience."""
