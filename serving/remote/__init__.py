"""The step models' engines in a process of their own (`--engine-process on`): the
server's link to it (`link`: start, send jobs, route deltas, restart) and the process
itself (`host`, run as `python -m serving.remote`)."""
