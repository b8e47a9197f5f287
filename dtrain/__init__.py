"""dtrain: training across workers joined by slow links, with almost no communication."""

__version__ = "0.1.0"
