"""Small chat records and a tokenizer corpus shared by the packed-mode mask tests (sliding window, FlexAttention):
a record with a system turn, one without, and a two-turn conversation."""

SYS = {"role": "system", "content": "Convert natural language to regular expression."}
RECORDS = [
    [SYS, {"role": "user", "content": "lines with words and a vowel"}, {"role": "assistant", "content": "(a|b)*x"}],
    [{"role": "user", "content": "lines containing the string dog, zero or more times"},
     {"role": "assistant", "content": "(.*dog.*)*"}],
    [SYS, {"role": "user", "content": "a vowel"}, {"role": "assistant", "content": "[aeiou]"},
     {"role": "user", "content": "now the string cat followed by a number"},
     {"role": "assistant", "content": "cat[0-9].*"}],
]
CORPUS = ["Convert natural language to regular expression.", "lines with words and a vowel, zero or more times",
          "lines containing the string dog (a|b)* [aeiou]+ dog.* cat[0-9]", "now the string cat followed by"] * 30
