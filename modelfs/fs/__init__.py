"""The FUSE side: the inode tree (`fs.tree`, sans-I/O) and the request handlers
(`fs.operations`, the one home of pyfuse3 apart from init/main/close in the
daemon). Import from the modules: this `__init__` imports nothing, so building a
config never loads pyfuse3."""
