"""The registry of diff encodings: one module each, registered here (name -> Encoding)."""
