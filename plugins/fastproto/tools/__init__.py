"""Tool implementations of fastproto (a regular package, so nothing on sys.path shadows it)."""
