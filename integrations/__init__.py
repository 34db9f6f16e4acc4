"""Helpers that connect dst_prune to other frameworks; installed as `dst_prune.integrations`.

Each module may import its outside framework; `dst_prune` itself does not.
"""
