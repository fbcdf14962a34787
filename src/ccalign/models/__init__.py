"""Autoregressive image generators, each family behind one interface.

``ccalign.models.family`` declares what a family offers (files, building, its sampler and
tokenizer, the memory estimate, what it can train) and what its models compute
(``model(conditions, tokens)``: sequence log-likelihoods); ``ccalign.models.families`` is the
registry (``of(model)``, ``get(name)``, ``identify(spec)``, ``register``). LlamaGen
(``models.llamagen``) and VAR (``models.var``) are the families that ship; the shared sampling
pieces are ``next_token`` (the KV-cache engine of next-token models), ``guidance`` and
``filtering``.
"""
