"""Recipes shipped with hubmerge (the package data of ``hubmerge_recipes``); YAML files, not code.

``hubmerge recipes list`` shows them; see :mod:`hubmerge.registry`.
"""
