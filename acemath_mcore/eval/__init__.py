"""Evaluation: answer grading (`grader`), benchmark loading and prompts (`benchmarks`), best-of-n metrics (`bestofn`).

Submodules are imported explicitly (``from acemath_mcore.eval.grader import is_equal``) so that importing the package
stays cheap; the grader pulls in sympy.
"""
