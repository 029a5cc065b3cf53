"""Tiny CODI: a small LLaMA-architecture model trained here, on CPU, to reason in continuous thoughts.

The data flows one way: ``task`` generates problems, ``vocab`` turns them into ids, ``objective`` scores
a batch (teacher CE, student CE after latent steps through CODI's own loop in ``ctexp.model.codi``,
optional distillation), ``train`` runs the curriculum, ``checkpoint`` writes CODI's layout so that
``ctexp extract`` reads it like a real checkpoint, and ``evaluate`` measures answer accuracy by number of
steps. The package sits above ``model`` and ``analysis`` (its intervals) and below ``experiment``, which
records a training run in the registry.
"""
