"""The byte-level format of spec/FORMAT.md: checksummed JSON, element types, byte planes, the
rANS plane coder, chunk frames and the state tree."""
