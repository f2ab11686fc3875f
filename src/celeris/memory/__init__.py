"""Evolved KV memory (NAMM) with a policy zoo, a chunked-prefill eviction runner, kvpress as a peer,
and an offline long-context task suite."""

from celeris.memory.policies import POLICIES, Budget, MemoryPolicy, make_policy, parse_budget
from celeris.memory.runner import MemoryResult, run_with_memory

__all__ = ["POLICIES", "Budget", "MemoryPolicy", "make_policy", "parse_budget", "MemoryResult", "run_with_memory"]
