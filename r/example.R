# parallelgen example: annotate texts with a local model, all prompts in one batch.
#
#   Rscript r/example.R            (with RETICULATE_PYTHON, or edit pg_use_python() below)
#
# Needs a Python environment with parallel_gen and a model, e.g. the project's .venv after
# `make setup`, which has the small SmolLM2-135M-Instruct model (the default model).
library(parallelgen)

pg_use_python()  # or: pg_use_python(virtualenv = "~/.venvs/parallel_gen")

reviews <- c(
  "I loved this film, the acting was wonderful.",
  "Terrible service, I will never come back.",
  "The package arrived on time and works as described.",
  "Boring, too long, and the ending made no sense."
)

model <- pg_model(n_parallel = 16, n_ctx = 512)  # n_ctx: tokens per prompt + answer
print(model)                                     # <pg_model> ...gguf: n_parallel 16, n_ctx 512, ...

# Chat: the model's own chat template, one conversation per text.
labels <- pg_chat(model, reviews, max_tokens = 8, temperature = 0,
                  system = "Classify the sentiment of the review. Answer with one word: positive or negative.")
print(data.frame(review = reviews, label = trimws(labels$text)))

# Probabilities instead of one generated word: P(label | review) for every label.
probs <- pg_classify(model, reviews, c("positive", "negative"), chat = TRUE,
                     system = "You label the sentiment of reviews.")
print(data.frame(review = substr(reviews, 1, 30), label = probs$label, p_positive = round(probs$positive, 3)))

# Plain completion: the prompts are sent as they are; a seed makes sampling repeatable.
out <- pg_generate(model, paste("A short poem about", c("the sea", "autumn", "R")),
                   max_tokens = 32, temperature = 0.7, seed = 42)
print(out[, c("text", "finish_reason", "completion_tokens")])

s <- pg_stats()  # the last call: a one-row data.frame
cat(sprintf("%d prompts, %d tokens in %.2f s (%.0f tokens/s generation)\n",
            s$prompts, s$completion_tokens, s$wall_seconds, s$generation_tokens_per_second))
pg_close(model)
