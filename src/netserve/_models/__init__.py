"""The concurrency models: where ``process_request()`` sends a request.

Threads, forked children, the bounded thread pool, and the greenlet hub (its
kernel, its cooperative socket and files, its watchdog), each built on the
core's one request runner; and the stdlib's predefined combinations.
"""
