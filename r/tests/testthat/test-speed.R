test_that("a 16-prompt batch is faster than 16 single calls from R", {
  # One thread for both sides (see helper-parallelgen.R): what is compared is batching.
  m16 <- pg_model(smollm2_path(), n_parallel = 16, n_ctx = 128, n_threads = 1)
  on.exit(pg_close(m16))
  p <- chat_prompt(sprintf("Write one sentence about the number %d.", 1:16))
  gen <- function(x) pg_generate(m16, x, max_tokens = 32, temperature = 0, ignore_eos = TRUE, progress = FALSE)
  wall <- function(expr) system.time(expr)[["elapsed"]]
  gen(p[1:2])  # warm-up
  # Singles, batch, batch, singles: a load spike on a shared machine hits both sides
  # alike; the best time of each side is compared.
  singles <- wall(for (x in p) one <- gen(x))
  batch <- wall(all <- gen(p))
  batch <- min(batch, wall(gen(p)))
  singles <- min(singles, wall(for (x in p) one <- gen(x)))
  expect_identical(all$completion_tokens, rep(32L, 16))
  expect_identical(one$completion_tokens, 32L)
  message(sprintf("16 prompts x 32 tokens from R: one batch %.2f s, 16 single calls %.2f s (%.1fx)",
                  batch, singles, singles / batch))
  expect_lt(batch, singles)
})
