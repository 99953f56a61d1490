"""More than one core: a supervisor and N worker processes sharing the listening sockets
(docs/workers.md)."""
