//! Verification of a semantic-cache candidate: an embedding says two texts are close, these
//! checks ask whether they can share an answer. Embeddings are weak exactly where the answer
//! changes: "turn on" vs "turn off", "5 USD" vs "50 USD", "one hour" vs "two hours", "Paris" vs
//! "Rome", order 12345 vs 12346. Each rule looks for one such difference; any difference rejects.
//!
//! [`RuleVerifier`] is the built-in [`Verifier`]; a model-based one (the word-vector check in
//! `words.rs`, or a cross-encoder) runs after it in a `Chain` or replaces it.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;

use super::verifier::{Rejection, Verifier};

#[derive(Debug, Default, Clone, Copy)]
pub struct RuleVerifier;

const NUMBER_WORDS: &[(&str, u64)] = &[
    ("zero", 0),
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("thirteen", 13),
    ("fourteen", 14),
    ("fifteen", 15),
    ("sixteen", 16),
    ("seventeen", 17),
    ("eighteen", 18),
    ("nineteen", 19),
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
    ("hundred", 100),
    ("thousand", 1000),
    ("million", 1_000_000),
    ("billion", 1_000_000_000),
    ("dozen", 12),
];
// Ordinals and words like "second", "double" or "once" are left out: too often they are not
// quantities ("wait a second", "double-check"), and a false difference only costs a miss.

/// Words that fix a date or time; two texts must name the same ones.
pub(super) const TIME_WORDS: &[&str] = &[
    "today",
    "tonight",
    "tomorrow",
    "yesterday",
    "morning",
    "afternoon",
    "evening",
    "night",
    "weekend",
    "weekday",
    "weekly",
    "daily",
    "hourly",
    "monthly",
    "yearly",
    "annual",
    "annually",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "am",
    "pm",
    "later",
    "next",
    "last",
    "past",
    "ago",
];

/// Words that negate what follows ("n't" is handled as a suffix).
const NEGATIONS: &[&str] = &[
    "not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor", "without",
    "cannot", "cant", "dont", "doesnt", "didnt", "wont", "wouldnt", "shouldnt", "couldnt", "isnt",
    "arent", "wasnt", "werent", "havent", "hasnt", "hadnt", "mustnt",
];

/// Pairs whose sides change the answer. Each word maps to its pair and side.
const POLARITY: &[(&str, &str)] = &[
    ("on", "off"),
    ("enable", "disable"),
    ("enabled", "disabled"),
    ("start", "stop"),
    ("open", "close"),
    ("opened", "closed"),
    ("increase", "decrease"),
    ("raise", "lower"),
    ("up", "down"),
    ("add", "remove"),
    ("buy", "sell"),
    ("before", "after"),
    ("lock", "unlock"),
    ("mute", "unmute"),
    ("allow", "deny"),
    ("accept", "reject"),
    ("include", "exclude"),
    ("min", "max"),
    ("minimum", "maximum"),
    ("more", "less"),
    ("most", "least"),
    ("in", "out"),
    ("import", "export"),
    ("upload", "download"),
    ("subscribe", "unsubscribe"),
    ("login", "logout"),
    ("activate", "deactivate"),
    ("connect", "disconnect"),
    ("install", "uninstall"),
    ("encrypt", "decrypt"),
    ("show", "hide"),
    ("plus", "minus"),
    ("cheapest", "dearest"),
    ("fastest", "slowest"),
    ("higher", "lower"),
    ("larger", "smaller"),
    ("bigger", "tinier"),
    ("north", "south"),
    ("east", "west"),
    ("left", "right"),
    ("true", "false"),
    ("win", "lose"),
    ("arrive", "depart"),
    ("arrival", "departure"),
    ("incoming", "outgoing"),
    ("send", "receive"),
    ("deposit", "withdraw"),
    ("credit", "debit"),
    ("refund", "charge"),
    ("hot", "cold"),
    // Word vectors put these as close as synonyms ("husband" / "wife" 0.87, "inbound" /
    // "outbound" 0.88, "closest" / "nearest" 0.82), so the word check cannot tell them apart.
    ("husband", "wife"),
    ("boyfriend", "girlfriend"),
    ("man", "woman"),
    ("men", "women"),
    ("male", "female"),
    ("boy", "girl"),
    ("mother", "father"),
    ("mom", "dad"),
    ("son", "daughter"),
    ("brother", "sister"),
    ("inbound", "outbound"),
    ("input", "output"),
    ("internal", "external"),
    ("public", "private"),
    ("small", "large"),
    ("upgrade", "downgrade"),
    ("early", "late"),
    ("earliest", "latest"),
    ("old", "new"),
    ("summer", "winter"),
    ("create", "delete"),
    ("pause", "resume"),
];

fn is_number_word(word: &str) -> Option<u64> {
    NUMBER_WORDS
        .iter()
        .find(|(w, _)| *w == word)
        .map(|(_, n)| *n)
}

/// Lowercased words with apostrophes removed ("don't" → "dont"), split on anything that is not a
/// letter or digit, except that a decimal point or comma between digits stays in a number.
pub(super) fn words(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut words = Vec::new();
    let mut current = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let between_digits = |c: char| {
            matches!(c, '.' | ',')
                && i > 0
                && chars[i - 1].is_ascii_digit()
                && chars.get(i + 1).is_some_and(char::is_ascii_digit)
        };
        if c.is_alphanumeric() || between_digits(c) {
            current.extend(c.to_lowercase());
        } else if c == '\'' || c == '’' {
            // "don't" → "dont"; "user's" → "users"
        } else if !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// Every number the text mentions, normalised: digits without thousands separators, number words
/// as their value, so "5" and "five" agree and "5" and "50" do not.
pub(super) fn numbers(words: &[String]) -> Vec<String> {
    let mut found: Vec<String> = words
        .iter()
        .enumerate()
        .filter(|&(i, word)| word != "one" || !one_is_a_pronoun(words, i))
        .filter_map(|(_, word)| {
            if word.chars().any(|c| c.is_ascii_digit()) {
                // "12:30", "3pm", "2nd", "1,000", "4.5": keep the digits and decimal point.
                let digits: String = word
                    .chars()
                    .filter(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                let trimmed = digits.trim_end_matches('.').to_owned();
                Some(match trimmed.parse::<f64>() {
                    Ok(value) if trimmed.contains('.') => format!("{value}"),
                    _ => trimmed,
                })
            } else if let Some(decade) = decade(word) {
                Some(format!("{decade}s"))
            } else {
                is_number_word(word).map(|n| n.to_string())
            }
        })
        .collect();
    found.sort_unstable();
    found
}

/// "the twenties" is a decade (20), not twenty of something.
fn decade(word: &str) -> Option<u64> {
    let tens = word.strip_suffix("ies")?;
    [
        ("twent", 20),
        ("thirt", 30),
        ("fort", 40),
        ("fift", 50),
        ("sixt", 60),
        ("sevent", 70),
        ("eight", 80),
        ("ninet", 90),
    ]
    .iter()
    .find(|(stem, _)| *stem == tens)
    .map(|(_, n)| *n)
}

/// "this one", "find one", "a one-way ticket": "one" points at a thing or is part of a word.
fn one_is_a_pronoun(words: &[String], index: usize) -> bool {
    let before = index.checked_sub(1).map(|i| words[i].as_str());
    let after = words.get(index + 1).map(String::as_str);
    before.is_some_and(|w| ONE_AS_PRONOUN.contains(&w) || ONE_AFTER_ADJECTIVE.contains(&w))
        || after.is_some_and(|w| ONE_BEFORE.contains(&w))
}

/// "find me one", "a good one", "my old one": a thing, not a count.
const ONE_AFTER_ADJECTIVE: &[&str] = &[
    "me",
    "us",
    "good",
    "old",
    "new",
    "nice",
    "cheap",
    "cheaper",
    "best",
    "better",
    "different",
    "same",
    "regular",
    "big",
    "small",
    "closest",
    "nearest",
    "right",
    "last",
    "next",
    "find",
    "get",
    "recommend",
    "suggest",
    "pick",
    "choose",
];

/// "one in Oakland", "a one-way ticket", "one of them": a thing or part of a word.
const ONE_BEFORE: &[&str] = &[
    "way", "another", "of", "that", "which", "with", "in", "near", "at", "around", "nearby",
];

/// "this one", "the one near the park": after these, "one" points at a thing, it does not count.
const ONE_AS_PRONOUN: &[&str] = &[
    "this", "that", "the", "which", "each", "every", "any", "another", "no", "some", "other",
];

pub(super) fn times(words: &[String]) -> Vec<String> {
    let mut found: Vec<String> = words
        .iter()
        .enumerate()
        .filter(|&(i, w)| TIME_WORDS.contains(&w.as_str()) && names_a_time(words, i))
        .map(|(_, w)| w.clone())
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// Whether the time word at `index` is one in its context: "am" and "pm" only after a number
/// ("I am" is no time), "may" only as a month (after "in", "of", a number or before one; "may I"
/// is no date), and "last", "next" and "past" only before a unit of time ("the last one").
fn names_a_time(words: &[String], index: usize) -> bool {
    let before = index.checked_sub(1).map(|i| words[i].as_str());
    let after = words.get(index + 1).map(String::as_str);
    let is_number = |w: Option<&str>| {
        w.is_some_and(|w| {
            w.starts_with(|c: char| c.is_ascii_digit()) || is_number_word(w).is_some()
        })
    };
    match words[index].as_str() {
        "am" | "pm" => is_number(before),
        "may" => {
            matches!(
                before,
                Some("in" | "of" | "during" | "until" | "since" | "mid" | "early" | "late")
            ) || is_number(before)
                || is_number(after)
        }
        "last" | "next" | "past" => after.is_some_and(|w| {
            TIME_UNITS.contains(&singular(w).as_str())
                || TIME_WORDS.contains(&w) && w != "last" && w != "next"
        }),
        _ => true,
    }
}

const TIME_UNITS: &[&str] = &[
    "second",
    "minute",
    "hour",
    "day",
    "night",
    "week",
    "weekend",
    "month",
    "year",
    "time",
    "morning",
    "afternoon",
    "evening",
    "quarter",
    "season",
];

/// Whether one text negates what the other asserts: the parities differ and a negated word (the
/// first word after a negation that is not an auxiliary, pronoun or article) is one the other
/// text has. "Is the store not open" / "is the store open" is a flip; "I don't know my password"
/// / "I have forgotten my password" is not (the other text never says "know").
pub(super) fn negation_flip(q: &[String], c: &[String]) -> bool {
    let (negated_side, other) = match (negated(q), negated(c)) {
        (true, false) => (q, c),
        (false, true) => (c, q),
        _ => return false,
    };
    let other: BTreeSet<String> = other.iter().map(|w| singular(w)).collect();
    negated_side
        .iter()
        .enumerate()
        .filter(|(_, w)| NEGATIONS.contains(&w.as_str()))
        .any(|(i, _)| {
            let head = negated_side[i + 1..].iter().find(|w| {
                !NEGATION_SKIPS.contains(&w.as_str()) && !NEGATIONS.contains(&w.as_str())
            });
            head.is_none_or(|head| other.contains(&singular(head)))
        })
}

/// Words between a negation and what it negates ("do not you open", "is not the store").
const NEGATION_SKIPS: &[&str] = &[
    "a", "an", "the", "i", "you", "we", "they", "he", "she", "it", "my", "your", "our", "their",
    "this", "that", "be", "been", "being", "have", "has", "had", "to", "even", "yet", "really",
    "very", "so", "too", "ever", "always", "quite", "at", "all", "any", "please",
];

/// Whether the text says "not" an odd number of times ("not impossible" is not a negation).
pub(super) fn negated(words: &[String]) -> bool {
    words
        .iter()
        .filter(|w| NEGATIONS.contains(&w.as_str()))
        .count()
        % 2
        == 1
}

/// Words that open a place a trip leaves from (`true`) or goes to (`false`).
const DIRECTIONS: &[(&str, bool)] = &[
    ("from", true),
    ("leaving", true),
    ("departing", true),
    ("to", false),
    ("into", false),
    ("towards", false),
    ("toward", false),
];

/// Whether the word at `at` opens a place a trip leaves from or goes to; "out of" leaves.
fn direction_at(words: &[String], at: usize) -> Option<bool> {
    if words[at] == "of" {
        return (at > 0 && words[at - 1] == "out").then_some(true);
    }
    DIRECTIONS
        .iter()
        .find(|(w, _)| *w == words[at])
        .map(|&(_, origin)| origin)
}

/// For each word that follows a direction word ("from Fresno", "to Fresno"): whether the text
/// leaves from it or goes to it, or `None` if it does both.
fn directions(words: &[String]) -> BTreeMap<&str, Option<bool>> {
    let mut found: BTreeMap<&str, Option<bool>> = BTreeMap::new();
    for at in 0..words.len().saturating_sub(1) {
        let Some(origin) = direction_at(words, at) else {
            continue;
        };
        let place = words[at + 1].as_str();
        if FUNCTION_WORDS.contains(&place) {
            continue;
        }
        found
            .entry(place)
            .and_modify(|seen| {
                if *seen != Some(origin) {
                    *seen = None;
                }
            })
            .or_insert(Some(origin));
    }
    found
}

/// A place one text leaves from and the other goes to ("a bus from Long Beach" / "a bus to
/// Long Beach"): the trip runs the other way.
pub(super) fn direction_flip(query: &[String], candidate: &[String]) -> Option<String> {
    let theirs = directions(candidate);
    directions(query).into_iter().find_map(|(place, ours)| {
        let (Some(ours), Some(Some(theirs))) = (ours, theirs.get(place)) else {
            return None;
        };
        (ours != *theirs).then(|| place.to_owned())
    })
}

/// For each polarity pair the text uses: which sides it uses, and the first word seen.
pub(super) fn polarity(words: &[String]) -> BTreeMap<usize, (BTreeSet<bool>, &str)> {
    let mut found: BTreeMap<usize, (BTreeSet<bool>, &str)> = BTreeMap::new();
    for word in words {
        for (pair, (a, b)) in POLARITY.iter().enumerate() {
            let side = if word == a {
                true
            } else if word == b {
                false
            } else {
                continue;
            };
            found
                .entry(pair)
                .or_insert_with(|| (BTreeSet::new(), word.as_str()))
                .0
                .insert(side);
        }
    }
    found
}

/// Words that carry grammar, not content: two texts differing only in these can share an answer
/// ("how do I" / "how can I", "where should I" / "where can I").
const FUNCTION_WORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "i",
    "me",
    "my",
    "mine",
    "you",
    "your",
    "yours",
    "we",
    "us",
    "our",
    "he",
    "she",
    "it",
    "its",
    "they",
    "them",
    "their",
    "this",
    "that",
    "these",
    "those",
    "there",
    "here",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "am",
    "do",
    "does",
    "did",
    "can",
    "could",
    "would",
    "should",
    "will",
    "shall",
    "may",
    "might",
    "must",
    "have",
    "has",
    "had",
    "to",
    "of",
    "for",
    "from",
    "with",
    "by",
    "about",
    "at",
    "as",
    "in",
    "on",
    "into",
    "onto",
    "please",
    "what",
    "whats",
    "when",
    "whens",
    "where",
    "wheres",
    "how",
    "hows",
    "why",
    "which",
    "who",
    "whom",
    "and",
    "or",
    "but",
    "if",
    "so",
    "just",
    "some",
    "any",
    "im",
    "ive",
    "id",
    "ill",
    "youre",
    "its",
    "want",
    "wanna",
    "like",
    "need",
    "tell",
    "know",
    "let",
    "lets",
    "get",
    "kindly",
    "hi",
    "hello",
    "hey",
    "thanks",
    "thank",
    "ok",
    "okay",
    "also",
    "then",
    "there",
    "still",
    "ever",
    "really",
    "very",
    // A question without a time asks about the present: "is it open now" is "is it open".
    "now",
    "currently",
];

pub(super) fn is_function_word(word: &str) -> bool {
    FUNCTION_WORDS.contains(&word)
}

/// The differing content words if the texts are one template with one slot filled differently:
/// a shared start and end (at least two words together), a non-empty middle on both sides, and
/// different content words in the middles.
pub(super) fn substitution(q: &[String], c: &[String]) -> Option<(String, String)> {
    let prefix = q.iter().zip(c).take_while(|(a, b)| a == b).count();
    let room = q.len().min(c.len()) - prefix;
    let suffix = q
        .iter()
        .rev()
        .zip(c.iter().rev())
        .take(room)
        .take_while(|(a, b)| a == b)
        .count();
    if prefix + suffix < 2 {
        return None;
    }
    let content = |words: &[String]| -> BTreeSet<String> {
        words
            .iter()
            .filter(|w| is_content_word(w))
            // A plural is not another slot value ("10 minutes" / "10 minute timer").
            .map(|w| singular(w))
            .collect()
    };
    let (qm, cm) = (
        content(&q[prefix..q.len() - suffix]),
        content(&c[prefix..c.len() - suffix]),
    );
    if qm.is_empty() || cm.is_empty() || qm == cm {
        return None;
    }
    let join = |set: BTreeSet<String>| set.into_iter().collect::<Vec<_>>().join(" ");
    Some((join(qm), join(cm)))
}

/// Tokens that name something specific: capitalised words not at the start of a sentence,
/// all-caps words, and codes mixing letters with digits or symbols (order ids, SKUs, emails).
pub(super) fn entities(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut sentence_start = true;
    // A text in capitals throughout ("GOODBYE") is shouted, not an acronym.
    let shouted = !text.chars().any(char::is_lowercase);
    for raw in text.split_whitespace() {
        let token: String = raw
            .trim_matches(|c: char| !c.is_alphanumeric() && c != '#' && c != '@')
            .to_owned();
        if token.is_empty() {
            sentence_start = raw.ends_with(['.', '!', '?']);
            continue;
        }
        let letters = token.chars().filter(|c| c.is_alphabetic()).count();
        let digits = token.chars().filter(|c| c.is_ascii_digit()).count();
        let capitalised = token.chars().next().is_some_and(char::is_uppercase);
        // "Hi, How are you", "HI, I am": a capitalised grammar word names nothing.
        let grammar = is_function_word(&token.to_lowercase());
        let all_caps = !shouted
            && !grammar
            && letters >= 2
            && token
                .chars()
                .filter(|c| c.is_alphabetic())
                .all(char::is_uppercase);
        let code = (letters > 0 && digits > 0) || token.contains('@') || token.starts_with('#');
        let pronoun_i = token == "I" || token.starts_with("I'");
        if code || all_caps || (capitalised && !sentence_start && !pronoun_i && !grammar) {
            // "ATM's", "ATMs" and "ATM" name one thing.
            let name: String = token
                .to_lowercase()
                .chars()
                .filter(|c| !matches!(c, '\'' | '’'))
                .collect();
            found.insert(singular(&name));
        }
        sentence_start = raw.ends_with(['.', '!', '?', ':']);
    }
    found
}

#[async_trait]
impl Verifier for RuleVerifier {
    async fn verify(&self, query: &str, candidate: &str) -> Result<(), Rejection> {
        self.check(query, candidate)
    }
}

/// The words of `text` that carry content: not grammar, and not what the rules compare on their
/// own terms (numbers, times, negations). A plural counts as its singular.
pub fn content_words(text: &str) -> BTreeSet<String> {
    words(text)
        .into_iter()
        .filter(|w| is_content_word(w) && !TIME_WORDS.contains(&w.as_str()))
        .map(|w| singular(&w))
        .collect()
}

/// Whether `query` differs from `neighbours`, entries that the upstream gave one answer, only as
/// they differ among themselves. Their differences are what that answer does not depend on
/// ("donuts" / "squishee" for a store finder); a word none of them has ("number" near questions
/// about opening hours) may be what another answer depends on. So every content word of the
/// query is one some neighbour has, and the query has every content word they all share.
pub fn within_agreement(query: &str, neighbours: &[&str]) -> bool {
    let Some((first, rest)) = neighbours.split_first() else {
        return false;
    };
    let query = content_words(query);
    let mut any = content_words(first);
    let mut all = any.clone();
    for neighbour in rest {
        let words = content_words(neighbour);
        all.retain(|w| words.contains(w));
        any.extend(words);
    }
    query.is_subset(&any) && all.is_subset(&query)
}

/// The words of `text` that may explain a content word the other text lacks: its content words
/// and its grammar words ("when" explains "time", "where" explains "location"), but not its
/// numbers and negations, which the rules compare by value and parity.
pub fn counterpart_words(text: &str) -> BTreeSet<String> {
    words(text)
        .into_iter()
        .filter(|w| {
            !NEGATIONS.contains(&w.as_str())
                && is_number_word(w).is_none()
                && !w.chars().any(|c| c.is_ascii_digit())
        })
        .map(|w| {
            if is_function_word(&w) {
                w
            } else {
                singular(&w)
            }
        })
        .collect()
}

/// Not grammar, and not a number or a negation: those are compared by value ("5" = "five") and
/// by parity ("can't" = "cannot") already.
pub(super) fn is_content_word(word: &str) -> bool {
    !is_function_word(word)
        && !NEGATIONS.contains(&word)
        && is_number_word(word).is_none()
        && !word.chars().any(|c| c.is_ascii_digit())
}

/// A rough singular, enough to match "hours" with "hour" and "addresses" with "address";
/// "status", "analysis" and "class" stay as they are.
pub(super) fn singular(word: &str) -> String {
    if ["sses", "xes", "ches", "shes"]
        .iter()
        .any(|suffix| word.ends_with(suffix))
    {
        return word[..word.len() - 2].to_owned();
    }
    match word.strip_suffix('s') {
        Some(stem) if stem.len() >= 3 && !stem.ends_with(['s', 'u', 'i']) => stem.to_owned(),
        _ => word.to_owned(),
    }
}

impl RuleVerifier {
    /// The rules without a runtime: [`Verifier::verify`] is this.
    pub fn check(&self, query: &str, candidate: &str) -> Result<(), Rejection> {
        let (q, c) = (words(query), words(candidate));
        let (qn, cn) = (numbers(&q), numbers(&c));
        if qn != cn {
            return Err(Rejection::Numbers {
                query: qn,
                candidate: cn,
            });
        }
        let (qt, ct) = (times(&q), times(&c));
        if qt != ct {
            return Err(Rejection::Times {
                query: qt,
                candidate: ct,
            });
        }
        if negation_flip(&q, &c) {
            return Err(Rejection::Negation);
        }
        if let Some(place) = direction_flip(&q, &c) {
            return Err(Rejection::Polarity {
                query: format!("from/to {place}"),
                candidate: format!("to/from {place}"),
            });
        }
        let (qp, cp) = (polarity(&q), polarity(&c));
        for (pair, (query_sides, query_word)) in &qp {
            if let Some((candidate_sides, candidate_word)) = cp.get(pair)
                && query_sides != candidate_sides
            {
                return Err(Rejection::Polarity {
                    query: (*query_word).to_owned(),
                    candidate: (*candidate_word).to_owned(),
                });
            }
        }
        // A name counts as shared if the other text has it too, capitalised or not ("West Oak"
        // / "west oak").
        let unshared =
            |names: BTreeSet<String>, other: &BTreeSet<String>, other_words: &[String]| {
                names
                    .into_iter()
                    .filter(|name| !other.contains(name) && !other_words.contains(name))
                    .collect::<Vec<_>>()
            };
        let (qe, ce) = (entities(query), entities(candidate));
        let (query_names, candidate_names) = (unshared(qe.clone(), &ce, &c), unshared(ce, &qe, &q));
        if !query_names.is_empty() || !candidate_names.is_empty() {
            return Err(Rejection::Entities {
                query: query_names,
                candidate: candidate_names,
            });
        }
        if let Some((query, candidate)) = substitution(&q, &c) {
            return Err(Rejection::Substitution { query, candidate });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(a: &str, b: &str) -> Result<(), Rejection> {
        RuleVerifier.check(a, b)
    }

    #[test]
    fn paraphrases_pass() {
        for (a, b) in [
            ("How do I cancel my order?", "I want to cancel my order"),
            (
                "What's the weather like in Paris today?",
                "How is the weather in Paris today?",
            ),
            ("Can you reset my password", "please reset my password"),
            ("Send 5 USD to Alice", "Send five USD to Alice"),
            ("Set a timer for 10 minutes", "set a 10 minute timer"),
            ("I can't log in", "I cannot log in"),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a:?} ~ {b:?}");
            assert_eq!(verdict(b, a), Ok(()), "{b:?} ~ {a:?}");
        }
    }

    #[test]
    fn different_numbers_amounts_and_times_are_rejected() {
        for (a, b) in [
            ("Send 5 USD to Alice", "Send 50 USD to Alice"),
            (
                "Mute notifications for one hour",
                "Mute notifications for two hours",
            ),
            ("Book a table for 4 at 7pm", "Book a table for 4 at 8pm"),
            ("Where is order 12345?", "Where is order 12346?"),
            (
                "Set the thermostat to 21.5 degrees",
                "Set the thermostat to 22 degrees",
            ),
            ("What happened in 1999?", "What happened in 2001?"),
            ("Transfer 1,000 dollars", "Transfer 100 dollars"),
        ] {
            assert!(
                matches!(verdict(a, b), Err(Rejection::Numbers { .. })),
                "{a:?} ~ {b:?}: {:?}",
                verdict(a, b)
            );
        }
    }

    #[test]
    fn a_trip_the_other_way_is_rejected() {
        for (a, b) in [
            (
                "Find me a bus to Long Beach",
                "I need a bus from Long Beach",
            ),
            ("a flight from SFO to JFK", "a flight from JFK to SFO"),
            (
                "one way flights that depart out of ATL",
                "I'm looking to book a flight to ATL",
            ),
            ("a train leaving Fresno", "a train to Fresno"),
        ] {
            assert!(
                matches!(verdict(a, b), Err(Rejection::Polarity { .. })),
                "{a:?} ~ {b:?}"
            );
        }
        for (a, b) in [
            ("a bus to Fresno", "I want to go to Fresno by bus"),
            (
                "I want to book a bus to Fresno",
                "I would like to book a bus to Fresno",
            ),
            ("a flight from SFO to JFK", "flights to JFK from SFO"),
            ("a flight out of SFO", "a flight from SFO"),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a:?} ~ {b:?}");
        }
    }

    #[test]
    fn negation_and_polarity_flips_are_rejected() {
        assert_eq!(
            verdict(
                "Is the store open on Sunday?",
                "Is the store not open on Sunday?"
            ),
            Err(Rejection::Negation)
        );
        assert_eq!(
            verdict("I can log in", "I can't log in"),
            Err(Rejection::Negation)
        );
        for (a, b) in [
            ("Turn on the light", "Turn off the light"),
            (
                "Enable two-factor authentication",
                "Disable two-factor authentication",
            ),
            (
                "How do I unsubscribe from the newsletter?",
                "How do I subscribe to the newsletter?",
            ),
            ("Lock the front door", "Unlock the front door"),
            ("Increase the volume", "Decrease the volume"),
            (
                "What should I get my husband for his birthday?",
                "Birthday present ideas for my wife",
            ),
            (
                "Block all inbound traffic on port 22",
                "How do I block outbound traffic on port 22?",
            ),
            (
                "How can I delete the account I made?",
                "Steps to create an account",
            ),
        ] {
            assert!(
                matches!(verdict(a, b), Err(Rejection::Polarity { .. })),
                "{a:?} ~ {b:?}: {:?}",
                verdict(a, b)
            );
        }
    }

    #[test]
    fn different_entities_and_codes_are_rejected() {
        for (a, b) in [
            (
                "What's the weather in Paris?",
                "What's the weather in Rome?",
            ),
            ("Where is my order #A1234?", "Where is my order #A1235?"),
            (
                "Compare the iPhone 15 and the Pixel 8",
                "Compare the iPhone 15 and the Galaxy S24",
            ),
            (
                "Email the report to bob@example.com",
                "Email the report to alice@example.com",
            ),
            ("What does HTTP stand for?", "What does SMTP stand for?"),
        ] {
            assert!(verdict(a, b).is_err(), "{a:?} ~ {b:?}");
        }
    }

    #[test]
    fn different_dates_and_times_are_rejected() {
        for (a, b) in [
            ("What's the weather today?", "What's the weather tomorrow?"),
            ("Is the shop open on Monday?", "Is the shop open on Friday?"),
            ("Remind me in the morning", "Remind me in the evening"),
            ("Book it for 7am", "Book it for 7pm"),
        ] {
            assert!(verdict(a, b).is_err(), "{a:?} ~ {b:?}");
        }
        assert!(matches!(
            verdict("weather today", "weather tomorrow"),
            Err(Rejection::Times { .. })
        ));
        // "now" is the present a question without a time asks about, but not another time.
        assert_eq!(
            verdict("Is the shop open now?", "Is the shop open?"),
            Ok(())
        );
        for other in ["Is the shop open tonight?", "Is the shop open later?"] {
            assert!(matches!(
                verdict("Is the shop open now?", other),
                Err(Rejection::Times { .. })
            ));
        }
    }

    #[test]
    fn words_read_in_context_are_no_differences() {
        for (a, b) in [
            // "am" and "may" are no times here, "one" no count, an apostrophe no other name.
            (
                "I am locked out of my account",
                "I'm locked out of my account",
            ),
            ("May I change my PIN?", "Can I change my PIN?"),
            ("Find me one in Oakland", "Find me a doctor in Oakland"),
            ("I want a one-way flight", "I want a one way flight"),
            (
                "Where is the nearest ATM's location?",
                "Where are the nearest ATMs?",
            ),
            (
                "HI, I need a salon in San Jose",
                "Find me a salon in San Jose",
            ),
            // Only the negated word decides: "know" is not in the other text.
            ("I don't know my password", "I have forgotten my password"),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a:?} ~ {b:?}");
            assert_eq!(verdict(b, a), Ok(()), "{b:?} ~ {a:?}");
        }
        for (a, b) in [
            ("Is the Elm store open?", "Is the Elm store not open?"),
            (
                "when do you open on Sunday",
                "when do not you open on Sunday",
            ),
        ] {
            assert_eq!(verdict(a, b), Err(Rejection::Negation), "{a:?} ~ {b:?}");
        }
        assert!(matches!(
            verdict("meet at 9 am", "meet at 10 am"),
            Err(Rejection::Numbers { .. })
        ));
        assert!(matches!(
            verdict("open in may", "open in june"),
            Err(Rejection::Times { .. })
        ));
        assert!(matches!(
            verdict(
                "play music from the twenties",
                "play music from the thirties"
            ),
            Err(Rejection::Numbers { .. })
        ));
    }

    #[test]
    fn a_name_written_in_lowercase_a_pronoun_one_and_shouting_are_no_differences() {
        for (a, b) in [
            (
                "store hours for the kwik-e-mart on West oak",
                "what are the store hours for the kwik-e-mart on west oak",
            ),
            ("When does this one open?", "When does the store open?"),
            ("Hi, How are you?", "hi, how are you?"),
            ("GOODBYE", "goodbye"),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a:?} ~ {b:?}");
            assert_eq!(verdict(b, a), Ok(()), "{b:?} ~ {a:?}");
        }
        assert!(matches!(
            verdict("Buy one ticket", "Buy two tickets"),
            Err(Rejection::Numbers { .. })
        ));
        assert!(matches!(
            verdict("What does NASA do?", "What does ESA do?"),
            Err(Rejection::Entities { .. })
        ));
    }

    #[test]
    fn content_words_leave_out_grammar_numbers_and_times() {
        assert_eq!(
            content_words("What are the store's hours on Sunday? Is it 5 or five? Not sure.")
                .into_iter()
                .collect::<Vec<_>>(),
            ["hour", "store", "sure"]
        );
        assert_eq!(
            content_words("the class address"),
            content_words("the class addresses")
        );
    }

    #[test]
    fn agreement_licenses_only_the_differences_among_the_neighbours() {
        let neighbours = [
            "Where can I buy donuts near me?",
            "Where can I buy a squishee near me?",
        ];
        assert!(within_agreement(
            "Where can I buy a squishee and donuts near me?",
            &neighbours
        ));
        // A word no neighbour has, or a word they all have missing.
        assert!(!within_agreement(
            "Where can I buy a slurpee near me?",
            &neighbours
        ));
        assert!(!within_agreement("Where are donuts near me?", &neighbours));
        let hours = [
            "When does the Elm Street store close?",
            "When does the Elm Street store open?",
        ];
        assert!(!within_agreement(
            "What is the number of the Elm Street store?",
            &hours
        ));
        assert!(!within_agreement("anything", &[]));
    }

    #[test]
    fn counterparts_include_grammar_words_but_not_numbers_or_negations() {
        assert_eq!(
            counterpart_words("When don't the stores open? At 5 or five?")
                .into_iter()
                .collect::<Vec<_>>(),
            ["at", "open", "or", "store", "the", "when"]
        );
    }

    #[test]
    fn tokenising_keeps_decimals_and_drops_apostrophes() {
        assert_eq!(
            words("It's 4.5, not 4,000 - don't!"),
            ["its", "4.5", "not", "4,000", "dont"]
        );
        assert_eq!(
            numbers(&words("4,000 and 1.50 and three")),
            ["1.5", "3", "4000"]
        );
        assert_eq!(Rejection::Negation.guard().label(), "negation");
    }

    #[test]
    fn one_slot_filled_differently_is_rejected_but_function_words_may_differ() {
        for (a, b) in [
            (
                "transfer 20 dollars from savings to checking",
                "transfer 20 dollars from money market to checking",
            ),
            (
                "what are the hours of the store on n oak?",
                "what are the hours of the store on gerard street?",
            ),
            ("call springfield mall", "take me to springfield mall"),
        ] {
            assert!(
                matches!(verdict(a, b), Err(Rejection::Substitution { .. })),
                "{a:?} ~ {b:?}: {:?}",
                verdict(a, b)
            );
        }
        for (a, b) in [
            ("Where can I park my car?", "Where should I park my car?"),
            ("How do I cancel my order?", "How can I cancel my order?"),
            ("what's the closest store?", "which store is closest to me?"),
        ] {
            assert_eq!(verdict(a, b), Ok(()), "{a:?} ~ {b:?}");
        }
    }
}
