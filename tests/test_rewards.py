"""Answer scorers for SVF rewards (lensjax.svf.rewards); expected values are worked out from the problems."""

import concurrent.futures
import random
import statistics
import time
from fractions import Fraction

import pytest

from lensjax.svf.rewards import (MATH_TIMEOUT_S, Choice, choice_extract, gsm8k_extract, gsm8k_reference, last_boxed,
                                 math_reference, parse_number, score_choice, score_gsm8k, score_math)

# ----------------------------------------------------------------------------------------------- GSM8K

NATALIA = ("Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May. "
           "The answer is 72.")
JANET = ("Janet's ducks lay 16 eggs per day. She eats 3 for breakfast and bakes muffins with 4, so she has "
         "16 − 3 − 4 = 9 eggs left. She sells each egg for $2, so she makes 9 × 2 = 18 dollars.\n"
         "The answer is 18.")


@pytest.mark.parametrize("text, value", [
    ("1,500", 1500), ("1,500,000", 1500000), ("1,5", 1), ("1,5000", 1), ("−5", -5), ("-5", -5),
    ("3.50", Fraction(7, 2)), ("$18.00", 18), ("18%", 18), ("**18**", 18), ("1/2", 1), ("48-24", 48),
    ("12,345.5 m", Fraction(24691, 2)), ("COVID-19 cases", 19), ("x-5", 5), ("so x = -5", -5), ("f(x)-2", 2),
    ("no digits here", None), ("", None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_gsm8k_reference():
    sol = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 1000 + 500 = <<1000+500=1500>>1500.\n#### 1,500"
    assert gsm8k_reference(sol) == "1,500"
    assert gsm8k_reference("  72 \n") == "72"


def test_gsm8k_answer_statement_beats_earlier_numbers():
    assert gsm8k_extract(NATALIA) == 72
    assert score_gsm8k(NATALIA, "72") == 1.0
    assert score_gsm8k(NATALIA, "48") == 0.0  # the old first-number rule


def test_gsm8k_unicode_minus_and_times():
    assert score_gsm8k(JANET, "18") == 1.0
    assert score_gsm8k(JANET, "9") == 0.0


@pytest.mark.parametrize("completion, gold", [
    ("Each box holds 300 pens, so 5 boxes hold 5 × 300 pens. The answer is 1,500 dollars.", "1500"),
    ("It was 7 degrees and fell by 12, so the temperature dropped to −5 degrees. #### -5", "-5"),
    ("A coffee is $1.75, so two cost 2 × 1.75. The answer is $3.50.", "3.5"),
    ("She earns 9 × 2 = 18 dollars.\n\n**Answer:** **18**", "18"),
    ("9 eggs at $2 each: the final answer is $18.", "18.0"),
    ("So she spends 3 + 4 = 7 hours, and then \\boxed{12} total. That is 5 more than 7.", "12"),
    ("Tom had 5 apples and bought 7 more, so now he has 12 apples", "12"),  # no statement: last number
])
def test_gsm8k_extraction_forms(completion, gold):
    assert score_gsm8k(completion, gold) == 1.0


def test_gsm8k_last_answer_statement_wins():
    # the prompt ends in "Answer:" and models often echo it before reasoning
    c = ("Answer: Let's think step by step. She buys 3 packs of 4 pens, so 3 × 4 = 12 pens, and gives 5 away.\n"
         "12 - 5 = 7. The answer is 7.")
    assert gsm8k_extract(c) == 7
    assert score_gsm8k(c, "3") == 0.0


def test_gsm8k_stray_numbers_after_the_answer():
    c = "She makes 9 × 2 = 18 dollars. The answer is 18.\nI hope this helps! Let me know if you have 2 more questions."
    assert score_gsm8k(c, "18") == 1.0
    assert score_gsm8k(c, "2") == 0.0


def test_gsm8k_negative_sign_only_when_standalone():
    assert score_gsm8k("It fell from 3 to −5. #### -5", "5") == 0.0
    assert score_gsm8k("The difference is 72-48 = 24", "24") == 1.0


def test_gsm8k_wrong_or_missing():
    assert score_gsm8k(NATALIA, "71") == 0.0
    assert gsm8k_extract("I am not sure how to solve this.") is None
    assert score_gsm8k("I am not sure how to solve this.", "12") == 0.0
    assert score_gsm8k("", "12") == 0.0


def test_numeric_gold_values_are_accepted():
    assert score_gsm8k(NATALIA, 72) == 1.0
    assert score_math(r"$\boxed{5}$", 5) == 1.0


def test_gsm8k_full_solution_as_gold():
    sol = "The first shop sells 1000 and the second 500.\nIn total 1000 + 500 = <<1000+500=1500>>1500.\n#### 1,500"
    assert score_gsm8k("Together they sell 1000 + 500 = 1500 items. The answer is 1500.", sol) == 1.0
    assert score_gsm8k("Together they sell 1000 + 500 = 1500 items. The answer is 1000.", sol) == 0.0


# ----------------------------------------------------------------------------------------------- MATH

def test_last_boxed():
    assert last_boxed(r"so $\boxed{\frac{1}{2}}$") == r"\frac{1}{2}"
    assert last_boxed(r"try \boxed{2}, then \boxed{\frac{1}{\sqrt{3}}}.") == r"\frac{1}{\sqrt{3}}"
    assert last_boxed(r"the set is \boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed(r"The answer is $\boxed 5$.") == "5"
    assert last_boxed(r"\fbox{7} done") == "7"
    assert last_boxed(r"first \boxed{3} then the output was cut \boxed{\frac{1") == "3"
    assert last_boxed("no box here") is None


def test_math_reference():
    sol = ("The roots of $x^2-5x+6$ are $2$ and $3$, and $\\{2,3\\}$ has sum $2+3=5$. "
           "The answer is $\\boxed{5}$.")
    assert math_reference(sol) == "5"
    assert math_reference(r"Hence the area is $\boxed{\frac{9\pi}{2}}$.") == r"\frac{9\pi}{2}"
    with pytest.raises(ValueError):
        math_reference("The answer is 5.")


MATH_CASES = [
    (r"We need $\frac{2}{4}$, which simplifies: $\boxed{\frac{1}{2}}$.", "0.5", 1.0),
    (r"We need $\frac{2}{4}$, which simplifies: $\boxed{\frac{1}{2}}$.", r"\frac12", 1.0),
    (r"Rationalising, $\sin 45^\circ = \boxed{\dfrac{\sqrt{2}}{2}}$", r"\frac{\sqrt2}{2}", 1.0),
    (r"So the ratio is \boxed{\frac{1}{\sqrt{3}}}", r"\frac{\sqrt{3}}{3}", 1.0),
    (r"A first try gives \boxed{2}. Checking again, the sum is $\boxed{4}$. Done.", "4", 1.0),
    (r"A first try gives \boxed{2}. Checking again, the sum is $\boxed{4}$. Done.", "2", 0.0),
    (r"Therefore $\boxed{3}$.", "4", 0.0),
    (r"Solving $2x-1=5$ gives $\boxed{x = 3}$.", "3", 1.0),
    (r"The discount is $\boxed{10\%}$.", "10", 1.0),
    (r"The solution set is $\boxed{(1, 2]}$.", "(1,2]", 1.0),
    (r"The solution set is $\boxed{[1, 2)}$.", "(1,2]", 0.0),
    (r"The point is $\boxed{(3,-4)}$.", "(3,-4)", 1.0),
    (r"Only option B works: $\boxed{\text{(B)}}$", r"\text{(B)}", 1.0),
    (r"Only option C works: $\boxed{\text{(C)}}$", r"\text{(B)}", 0.0),
    (r"The angle is $\boxed{30^\circ}$.", "30", 1.0),
    (r"Expanding, the product is $\boxed{x^2+2x+1}$.", "(x+1)^2", 1.0),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac34", 1.0),  # no box: statement
    ("Final Answer: The final answer is $x=3$. I hope it is correct.", "3", 1.0),
    ("Answer: 5 apples? No, I miscounted one basket. The answer is 6.", "6", 1.0),
    ("Answer: 5 apples? No, I miscounted one basket. The answer is 6.", "5", 0.0),
    ("After all that work, the answer is", "5", 0.0),
    ("Adding them up I get 5, I think.", "5", 0.0),  # neither a box nor an answer statement
    ("", "5", 0.0),
]


@pytest.mark.parametrize("completion, gold, expected", MATH_CASES)
def test_score_math(completion, gold, expected):
    assert score_math(completion, gold) == expected


def test_score_math_gold_given_as_solution():
    assert score_math(r"$\boxed{5}$", r"The answer is $\boxed{5}$.") == 1.0


def test_score_math_from_worker_threads_matches_main_thread():
    main = [score_math(c, g) for c, g, _ in MATH_CASES]
    assert main == [e for _, _, e in MATH_CASES]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda case: score_math(case[0], case[1]), MATH_CASES * 2))
    assert threaded == main * 2


def test_score_math_time_is_bounded():
    times = []
    for c, g, _ in MATH_CASES:
        t0 = time.perf_counter()
        score_math(c, g)
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.5
    tower = r"$\boxed{9^{9^{9^{9}}}}$"  # sympy would try to evaluate this for a very long time
    for run in (lambda: score_math(tower, "5"),
                lambda: concurrent.futures.ThreadPoolExecutor(1).submit(score_math, tower, "5").result()):
        t0 = time.perf_counter()
        assert run() == 0.0
        assert time.perf_counter() - t0 < MATH_TIMEOUT_S + 5
    assert score_math(r"$\boxed{3}$", "3") == 1.0  # still works afterwards


def test_score_math_in_process_fallback(monkeypatch):
    from lensjax.svf import rewards
    monkeypatch.setattr(rewards._HELPER, "broken", True)  # as if no helper process could be started
    expected = [e for _, _, e in MATH_CASES]
    assert [score_math(c, g) for c, g, _ in MATH_CASES] == expected
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # no signals off the main thread: must not raise
        assert list(pool.map(lambda case: score_math(case[0], case[1]), MATH_CASES)) == expected
    t0 = time.perf_counter()
    assert score_math(r"$\boxed{9^{9^{9^{9}}}}$", "5") == 0.0  # main thread: the setitimer deadline
    assert time.perf_counter() - t0 < MATH_TIMEOUT_S + 2


# ----------------------------------------------------------------------------------------------- ARC

ABCD = ("A", "B", "C", "D")


def test_choice_article_a_does_not_beat_explicit_answer():
    c = ("This is a question about photosynthesis. A plant needs light to make sugar, and water alone "
         "is not enough. Therefore the answer is (B).")
    assert choice_extract(c, ABCD) == "B"
    assert score_choice(c, Choice("B", ABCD)) == 1.0
    assert score_choice(c, Choice("A", ABCD)) == 0.0


@pytest.mark.parametrize("completion, expected", [
    ("Answer: C", "C"),
    ("Let me think. Sound travels fastest in solids.\nAnswer: **(C)**", "C"),
    ("D. Because the magnet attracts iron filings.", "D"),
    ("(A) Oxygen is released as a product.", "A"),
    ("B\n\nExplanation: ice melts when heated.", "B"),
    ("Comparing the options, the correct option is C, since copper conducts.", "C"),
    ("At first I considered (A). Option D is correct because friction produces heat.", "D"),
    (r"The final answer is $\boxed{A}$.", "A"),
    ("The answer is (B). Some might pick C. Actually, the answer is C.", "C"),  # the LAST statement
    ("The answer is (B), not the answer is (E).", "B"),  # E is not a label of this record
    ("A plant needs light, so I would go with sunlight here.", None),
    ("this is a tricky one: a plant would die without light.", None),  # lowercase a is not A
    ("I first thought C might be right. The answer is E.", None),
    ("", None),
])
def test_choice_extract_letters(completion, expected):
    assert choice_extract(completion, ABCD) == expected


def test_choice_numeric_labels():
    labels = ("1", "2", "3", "4")
    assert choice_extract("Water evaporates when heated. The answer is 3", labels) == "3"
    assert choice_extract("3) evaporation, because heat turns liquid water into vapour.", labels) == "3"
    assert choice_extract("It takes 3.5 hours, so the answer is 2.", labels) == "2"
    assert choice_extract("The answer is 7.", labels) is None
    assert score_choice("The answer is 3", Choice("3", labels)) == 1.0
    assert score_choice("The answer is 3", "3") == 1.0


def test_choice_by_text():
    texts = ("sunlight", "soil", "water", "wind")
    c = "Plants make their food by photosynthesis, and the energy for it comes from sunlight."
    assert choice_extract(c, ABCD, texts) == "A"
    assert score_choice(c, Choice("A", ABCD, texts)) == 1.0
    assert choice_extract("Both soil and water matter.", ABCD, texts) is None  # two texts: no guess
    assert choice_extract("Moonlight is not a source of energy.", ABCD, ("light", "soil", "water", "wind")) is None


def test_choice_nothing_parseable_is_deterministic_zero():
    c = "I cannot decide between these options; they all seem plausible to me."
    assert [score_choice(c, Choice("B", ABCD)) for _ in range(10)] == [0.0] * 10
    assert [choice_extract(c, ABCD) for _ in range(10)] == [None] * 10


def test_score_choice_plain_string_reference():
    assert score_choice("The answer is (E).", "E") == 1.0
    assert score_choice("The answer is (E).", "D") == 0.0


# ----------------------------------------------------------------------------------------------- fuzz

FRAGMENTS = ["The answer is", "answer:", "answer is", "answer is.", "####", "\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "$", "-", "−", "1", "7",
             ",", ".", "A", "(B)", "a", "3)", " ", "\n", "é", "中", "🙂", "\\frac", "\\", "%", "**", "0", "9", "x", "=",
             "\\text{", "(", "]", "Option", "correct", "\x00", "\ud7ff", "\ud800"]


def test_fuzz_never_raises():
    rng = random.Random(1234)
    strings = ["", " ", "1" * 20000, "{" * 5000, "\\boxed{" * 2000, "1,000" * 3000, "(" * 10000 + "A"]
    strings += ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    for s in strings:
        assert score_gsm8k(s, "17") in (0.0, 1.0)
        assert score_gsm8k("The answer is 17.", s) in (0.0, 1.0)
        assert score_choice(s, Choice("B", ABCD, ("light", "soil", "", "wind"))) in (0.0, 1.0)
        assert score_choice(s, "2") in (0.0, 1.0)
        assert score_math(s, r"\frac{1}{2}") in (0.0, 1.0)
        assert score_math(r"$\boxed{7}$", s) in (0.0, 1.0)
