"""pagedq job worker: Celery on Redis, one engine per worker process, results in SQL."""
