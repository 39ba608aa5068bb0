"""Built-in hubmerge merge methods, each a plugin loaded through the ``hubmerge`` entry-point group."""
