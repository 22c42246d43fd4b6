"""The control plane: a local HTTP/JSON API on a Unix socket (jobs, status, events,
metrics) in `server`, and the client the CLI talks to it with in `client`. Import
the submodule you need: the client does not pull in the server's libraries."""
