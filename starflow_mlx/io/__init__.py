"""Files in and out, and the checks on them: weights, model folders, names to folders, downloads, loaders,
staged writes, inputs, memory planning, and the ranks of several processes (ARCHITECTURE.md: the I/O layer)."""
