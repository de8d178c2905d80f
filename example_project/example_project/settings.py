"""Settings of the example project: the resilience add-on, on a crawl kept on loopback.

Values that Scrapy also has as defaults are pinned here anyway, so the example and the
benchmarks built on it behave the same when a Scrapy release changes a default.
"""

BOT_NAME = "example_project"

SPIDER_MODULES = ["example_project.spiders"]
NEWSPIDER_MODULE = "example_project.spiders"

# Enables every scrapy-resilience component at its fixed priority and replaces
# Scrapy's RetryMiddleware with the backoff retry. To compare with stock Scrapy,
# run with `-s ADDONS={}`.
ADDONS = {"scrapy_resilience.Addon": 500}

# Scrapy's default of 180 s would let one blackhole host keep a download slot busy
# for three minutes per request. Loopback pages arrive in well under a second, so
# 10 s only expires on hosts that never respond.
DOWNLOAD_TIMEOUT = 10

# Scrapy's defaults, pinned because the example compares runs. The add-on enforces
# the per-domain limit itself, since Scrapy 2.14 to 2.19 exceed it under asyncio.
CONCURRENT_REQUESTS = 16
CONCURRENT_REQUESTS_PER_DOMAIN = 8

# No slot delay: a request waiting for its slot delay sits inside the downloader and
# blocks every other domain. The add-on paces domains outside the downloader.
DOWNLOAD_DELAY = 0

# Obey robots.txt as a polite crawler should. The fault hosts serve none (a 404
# allows everything), but the robots.txt fetches meet the same faults as pages.
ROBOTSTXT_OBEY = True

# The add-on's per-domain report (circuit states, what was given up and why).
RESILIENCE_REPORT_FILE = "resilience-report.json"

# The Python docs link to thousands of outside sites. The loopback guard runs
# before every other downloader middleware and drops any request whose host is
# not a loopback IP or a name listed below.
DOWNLOADER_MIDDLEWARES = {
    "example_project.middlewares.LoopbackGuardMiddleware": 10,
}
LOOPBACK_GUARD_ENABLED = True
# Names that a test resolver maps to loopback, as fnmatch patterns such as "*.test".
# Only list names that can never reach real DNS.
LOOPBACK_GUARD_ALLOWED_HOSTS: list[str] = []

# Scrapy logs every request at DEBUG; INFO keeps a crawl of thousands of pages
# readable and cheap.
LOG_LEVEL = "INFO"

# Write items as UTF-8 rather than \u escapes (Scrapy's default is None, ASCII for JSON).
FEED_EXPORT_ENCODING = "utf-8"

# The telnet console listens on port 6023 and is not needed here. Off, parallel
# crawls on one machine do not compete for its port.
TELNETCONSOLE_ENABLED = False
