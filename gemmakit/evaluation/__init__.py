"""Evaluation whose method is stated: perplexity and multiple-choice log-likelihood.

Modules, in import order: `logprobs` (log p(target) from hidden states, chunked),
`perplexity` (strided windows), `tasks` (multiple-choice task files and their prompts),
`scoring` (continuation log-likelihoods and accuracy), `settings` (the models compared),
`table` (plain text tables), `imatrix` (llama-imatrix's importance matrix); `verify`
compares two models, `lm_eval_adapter` plugs gemmakit into lm-evaluation-harness.
"""
