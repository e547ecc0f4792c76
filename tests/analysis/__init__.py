"""Tests of duodiff_fast.analysis."""
