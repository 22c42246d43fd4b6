"""The mount daemon, one module a job:

- `serve`: the lifecycle (open, resolve, mount, serve, undo in reverse);
- `layout`: which directory shows which repo (and the Hugging Face cache view);
- `follow`: re-resolving moved branches, tags and URLs, and swapping trees in;
- `mountpoint`: refusing a busy mountpoint, clearing a dead one;
- `kernel`: read-ahead and FUSE queue knobs, fusectl, malloc, systemd notify.

Import from the modules: only `serve` loads pyfuse3.
"""
