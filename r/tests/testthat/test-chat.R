test_that("conversations in every R form become the same Python structure", {
  f <- parallelgen:::.check_conversations
  hi <- list(list(role = "user", content = "hi"))
  expect_identical(f("hi"), list(hi))
  expect_identical(f(c("hi", "hi")), list(hi, hi))
  expect_identical(f(list("hi")), list(hi))
  expect_identical(f(data.frame(role = "user", content = "hi")), list(hi))
  expect_identical(f(list(data.frame(role = "user", content = "hi", stringsAsFactors = TRUE))), list(hi))
  expect_identical(f(list(hi)), list(hi))
  expect_identical(f(list(list(c(role = "user", content = "hi")))), list(hi))
  expect_identical(f(character(0)), list())
  with_system <- f(c("hi", "hi"), system = "Be brief.")
  expect_identical(with_system[[2]], c(list(list(role = "system", content = "Be brief.")), hi))
  has_system <- list(list(list(role = "system", content = "Own."), hi[[1]]))
  expect_identical(f(has_system, system = "Be brief."), has_system)
})

test_that("pg_chat rejects NA and malformed conversations with R errors naming the place", {
  m <- test_model()
  expect_error(pg_chat(m, c("hi", NA)), "conversations[2]", fixed = TRUE, class = "pg_argument_error")
  expect_error(pg_chat(m, list(list(list(role = "user", content = NA_character_)))),
               "conversations[[1]][[1]]$content is NA", fixed = TRUE, class = "pg_argument_error")
  expect_error(pg_chat(m, list("ok", data.frame(role = c("user", NA), content = c("a", "b")))),
               "conversations[[2]][[2]]$role is NA", fixed = TRUE, class = "pg_argument_error")
  expect_error(pg_chat(m, list(role = "user", content = "hi")), "single message", class = "pg_argument_error")
  expect_error(pg_chat(m, list(list(role = "user", content = "hi"))), "wrap it in list()", fixed = TRUE,
               class = "pg_argument_error")
  expect_error(pg_chat(m, list(list(list(role = "user")))), "must be a message", class = "pg_argument_error")
  expect_error(pg_chat(m, 1:2), "conversations", class = "pg_argument_error")
  expect_error(pg_chat(m, "hi", system = NA_character_), "`system`", class = "pg_argument_error")
})

test_that("pg_chat answers every conversation, in order, on the real model", {
  m <- test_model()
  convs <- list("What is the capital of France?",
                data.frame(role = c("system", "user"),
                           content = c("You are terse.", "Name a yellow fruit.")),
                list(list(role = "user", content = "Say hello in Spanish.")))
  out <- pg_chat(m, convs, max_tokens = 8, temperature = 0, seed = 1, progress = FALSE)
  expect_s3_class(out, "data.frame")
  expect_named(out, c("prompt", "text", "finish_reason", "stop_reason", "prompt_tokens", "completion_tokens",
                     "error"))
  expect_identical(nrow(out), 3L)
  expect_true(all(out$finish_reason %in% c("stop", "length")))
  expect_true(all(is.na(out$error)))
  expect_true(all(out$completion_tokens >= 1L & out$completion_tokens <= 8L))
  expect_match(out$prompt[1], "capital of France", fixed = TRUE)
  expect_match(out$prompt[2], "yellow fruit", fixed = TRUE)
  expect_match(out$prompt[2], "You are terse.", fixed = TRUE)
  expect_match(out$prompt[3], "hello in Spanish", fixed = TRUE)
  expect_identical(pg_stats()$prompts, 3L)

  one <- pg_chat(m, "Hi!", max_tokens = 2, progress = TRUE)  # a bar, or a note that tqdm is missing
  expect_identical(nrow(one), 1L)
  sys <- pg_chat(m, c("Hi!", "Bye!"), system = "Answer in French.", max_tokens = 2, progress = FALSE)
  expect_true(all(grepl("Answer in French.", sys$prompt, fixed = TRUE)))
  expect_error(pg_chat(m, "Hi!", max_tokens = 0, progress = FALSE), class = "pg_python_error")
  expect_error(pg_chat(m, "Hi!", progress = "yes"), "`progress` must be TRUE or FALSE", class = "pg_argument_error")
})
