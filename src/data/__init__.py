"""Datasets the trainer can run on without a dataset hub (see ``data.arithmetic``)."""
