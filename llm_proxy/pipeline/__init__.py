"""The request pipeline of the generation endpoints, one module per phase.

Start at `request.handle`; its docstring names the phases. This package imports nothing
on purpose: llm_proxy.formats and llm_proxy.translate import `pipeline.sse`, and the
phases import them.
"""
