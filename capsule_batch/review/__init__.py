"""Reviewing a study: the local review app (`app`), the self-contained HTML report (`report`), and the
reviewer decisions kept in the study file's `review` group (`decisions`)."""
