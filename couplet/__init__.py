"""couplet: a Chinese couplet (对联) robot and the data pipeline that trains it."""

__version__ = "0.1.0"
