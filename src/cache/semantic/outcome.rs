//! What the semantic stage did for one request, as types: the edge turns them into the
//! `x-reprise-cache-semantic` header and metric labels, and nothing in between handles strings.

use super::verifier::Rejection;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SemanticOutcome {
    Hit,
    /// Answered with the one answer its nearest neighbours were all given (answer agreement).
    HitAgreement,
    Miss,
    /// The best candidate above the threshold was refused by a guard.
    Rejected(Guard),
    /// The embedding queue was full: the stage was skipped for this request.
    Overloaded,
    /// Embedding failed: the stage was skipped for this request.
    Error,
    /// A refresh: nothing is read, the new answer is stored.
    WriteOnly,
    /// The request does not use the semantic stage.
    Skipped(SkipReason),
}

/// What refused a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    Numbers,
    Times,
    Negation,
    Polarity,
    Entities,
    Substitution,
    Content,
    /// Feedback about a wrong hit raised the entry's threshold above this similarity.
    Feedback,
    /// `calibrated`: the probability that the entry's answer fits is below the cut-off.
    Score,
    /// `calibrated`: two entries that were answered differently both match.
    Ambiguous,
}

/// Why a request does not use the semantic stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The exact cache is bypassed for this request, and so is the semantic stage.
    Bypass,
    /// `x-reprise-cache-semantic: off`.
    Request,
    Temperature,
    Tools,
    ToolCalls,
    NoUserTurn,
    NonText,
    Empty,
    /// A prompt version without free-text variables: nothing varies but what the exact key holds.
    NoFreeText,
    /// Longer than the embedding model reads: its vector would stand for its beginning only, and
    /// two texts alike there would match whatever follows.
    TooLong,
}

impl SemanticOutcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::HitAgreement => "hit-agreement",
            Self::Miss => "miss",
            Self::Rejected(guard) => match guard {
                Guard::Numbers => "rejected-numbers",
                Guard::Times => "rejected-times",
                Guard::Negation => "rejected-negation",
                Guard::Polarity => "rejected-polarity",
                Guard::Entities => "rejected-entities",
                Guard::Substitution => "rejected-substitution",
                Guard::Content => "rejected-content",
                Guard::Feedback => "rejected-feedback",
                Guard::Score => "rejected-score",
                Guard::Ambiguous => "rejected-ambiguous",
            },
            Self::Overloaded => "overloaded",
            Self::Error => "error",
            Self::WriteOnly => "write-only",
            Self::Skipped(reason) => match reason {
                SkipReason::Bypass => "skipped-bypass",
                SkipReason::Request => "skipped-request",
                SkipReason::Temperature => "skipped-temperature",
                SkipReason::Tools => "skipped-tools",
                SkipReason::ToolCalls => "skipped-tool-calls",
                SkipReason::NoUserTurn => "skipped-no-user-turn",
                SkipReason::NonText => "skipped-non-text",
                SkipReason::Empty => "skipped-empty",
                SkipReason::NoFreeText => "skipped-no-free-text",
                SkipReason::TooLong => "skipped-too-long",
            },
        }
    }

    pub fn is_hit(self) -> bool {
        matches!(self, Self::Hit | Self::HitAgreement)
    }
}

impl Guard {
    /// The metric label of `reprise_semantic_rejections_total`.
    pub fn label(self) -> &'static str {
        match self {
            Guard::Numbers => "numbers",
            Guard::Times => "times",
            Guard::Negation => "negation",
            Guard::Polarity => "polarity",
            Guard::Entities => "entities",
            Guard::Substitution => "substitution",
            Guard::Content => "content",
            Guard::Feedback => "feedback",
            Guard::Score => "score",
            Guard::Ambiguous => "ambiguous",
        }
    }
}

impl Rejection {
    pub fn guard(&self) -> Guard {
        match self {
            Rejection::Numbers { .. } => Guard::Numbers,
            Rejection::Times { .. } => Guard::Times,
            Rejection::Negation => Guard::Negation,
            Rejection::Polarity { .. } => Guard::Polarity,
            Rejection::Entities { .. } => Guard::Entities,
            Rejection::Substitution { .. } => Guard::Substitution,
            Rejection::Content { .. } => Guard::Content,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_the_documented_header_values() {
        assert_eq!(
            SemanticOutcome::Rejected(Guard::Numbers).label(),
            "rejected-numbers"
        );
        assert_eq!(
            SemanticOutcome::Skipped(SkipReason::ToolCalls).label(),
            "skipped-tool-calls"
        );
        assert_eq!(SemanticOutcome::HitAgreement.label(), "hit-agreement");
        for guard in [Guard::Times, Guard::Content, Guard::Feedback] {
            assert_eq!(
                SemanticOutcome::Rejected(guard).label(),
                format!("rejected-{}", guard.label())
            );
        }
    }
}
