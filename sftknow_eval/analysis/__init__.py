"""Analysis of what SFT changed: token-level (first-answer-token KL) and parameter-level
(relative update of every weight), with plots."""
