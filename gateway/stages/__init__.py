"""The stages of a paid request, in order: route → challenge → verify → bridge → settle → respond.

``gateway.pipeline`` composes them; each module here does one stage's job.
"""
