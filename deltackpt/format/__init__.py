"""The byte-level format (spec/FORMAT.md: checksummed JSON, element types, byte planes, the rANS plane coder, chunk frames, the state tree)."""
