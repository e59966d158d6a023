"""The ps_kernels ops the decoding loop calls, with value checks off (the loop's indices come
from tree_accept and its own buffers, so the checks' host syncs would be pure cost).

Ops whose public version has not landed in ps_kernels yet are taken from ps_kernels.reference,
which has the same semantics (it is their specification)."""
from __future__ import annotations

import functools

import ps_kernels
from ps_kernels import reference as _reference


def _op(name: str):
    public = getattr(ps_kernels, name, None)
    if public is None:
        return getattr(_reference, name)
    return functools.partial(public, validate=False)


def _helper(name: str):
    return getattr(ps_kernels, name, None) or getattr(_reference, name)


kv_rollback = _op("kv_rollback")
tree_attention = _op("tree_attention")
tree_accept = _op("tree_accept")
tree_mask_from_parents = _helper("tree_mask_from_parents")
