"""Sources: where model files come from (hf and plain http now; s3, file later).

Every source answers the same small interface (`modelfs.types.Source`): resolve
a repo+revision to an immutable commit, list its files, read a byte range of
one version of a file. Nothing here knows about the cache or FUSE. Import from
the modules (`remote.hf`, `remote.http`, `remote.config`): this package's
`__init__` imports nothing, so a command that only builds configs never loads
httpx.
"""
