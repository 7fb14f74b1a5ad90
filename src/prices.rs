//! What tokens cost, by model (`[prices]`): the cache reports what its hits saved and the prompt
//! store what each version spent, both from this one table.

use std::collections::HashMap;

/// Prices in USD per million tokens, to estimate what cache hits saved.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

/// USD per million tokens by model, to estimate what an answer cost (or a hit saved).
#[derive(Debug, Default)]
pub struct PriceTable(pub HashMap<String, Price>);

impl PriceTable {
    /// The price of the model that produced an answer: by the target's model name, else by the
    /// model the upstream reported.
    pub fn price(&self, target: Option<&str>, reported_model: Option<&str>) -> Option<Price> {
        let target_model = target
            .and_then(|t| t.split_once('/'))
            .map(|(_, model)| model);
        target_model
            .and_then(|m| self.0.get(m))
            .or_else(|| target.and_then(|t| self.0.get(t)))
            .or_else(|| reported_model.and_then(|m| self.0.get(m)))
            .copied()
    }

    /// The estimated cost of `prompt` input and `completion` output tokens (0 without a price).
    pub fn cost(
        &self,
        target: Option<&str>,
        reported_model: Option<&str>,
        prompt: u64,
        completion: u64,
    ) -> f64 {
        self.price(target, reported_model).map_or(0.0, |p| {
            (prompt as f64 * p.input + completion as f64 * p.output) / 1e6
        })
    }
}

impl PriceTable {
    pub fn from_config(
        prices: &std::collections::BTreeMap<String, crate::config::PriceConfig>,
    ) -> Self {
        Self(
            prices
                .iter()
                .map(|(model, p)| {
                    (
                        model.clone(),
                        Price {
                            input: p.input,
                            output: p.output,
                        },
                    )
                })
                .collect(),
        )
    }
}
