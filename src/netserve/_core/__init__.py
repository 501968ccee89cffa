"""The core: the stdlib's server classes and what every model shares.

The template-method ``BaseServer`` and its one accept routine and one request
runner, the family servers, the handlers, the connection table and its
statistics, the stop control, the connection stages, the limits and time-outs,
errors and logging. Nothing here knows which model runs a request.
"""
