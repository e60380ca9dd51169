"""The training layer: the one trainer, its phases (``train_run``), auxiliary objectives,
recipes, pretraining, the evaluator and the zoo build. Sits on ``ktm.model`` and ``ktm.tasks``."""
