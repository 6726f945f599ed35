"""posttrain: study and steer how post-training changes a language model."""

__version__ = "0.1.0"
