"""Restarts that drop nothing: a running process starts its successor, hands it the
listening sockets and steering groups, and drains once the successor serves
(docs/restarts.md)."""
