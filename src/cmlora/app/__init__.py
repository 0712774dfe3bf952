"""Front-ends over the core (``cmlora.api``, ``cmlora.request``, ``cmlora.records``).

Each front-end builds ``GenerationRequest`` objects and reads ``GenerationRecord`` objects; none
holds generation logic and none imports another front-end, so a change to one cannot break another.
"""
