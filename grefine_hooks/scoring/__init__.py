"""Scoring: the PQ-Map and AQ-Map (`QualityScorer`) and learning the PQ-Map's prompts."""

from .prompt_training import TrainingResult, train_quality_prompts

__all__ = ["TrainingResult", "train_quality_prompts"]
