//! The `prompts/` folder: one folder per prompt id, holding `v1.toml`, `v2.toml`, ... (one file
//! per version) and optionally `labels.toml`. Every error names the file and the line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::labels::LabelTarget;
use super::spec::{CompiledVersion, SpecError, VersionSpec, is_valid_name};

#[derive(Debug)]
pub struct PromptFiles {
    pub id: String,
    pub versions: Vec<FileVersion>,
    pub labels: Option<FileLabels>,
}

#[derive(Debug)]
pub struct FileVersion {
    pub number: u32,
    pub path: PathBuf,
    pub spec: VersionSpec,
}

#[derive(Debug)]
pub struct FileLabels {
    pub path: PathBuf,
    /// blake3 of the file's text.
    pub hash: String,
    pub labels: BTreeMap<String, LabelTarget>,
}

#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct FileError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

fn file_error(path: &Path, line: Option<usize>, message: impl Into<String>) -> FileError {
    FileError {
        path: path.to_owned(),
        line,
        message: message.into(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Reads every prompt under `dir`, checking each version compiles. A missing folder is no
/// prompts.
pub fn read_dir(dir: &Path) -> Result<Vec<PromptFiles>, FileError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_error(dir, None, e.to_string())),
    };
    let mut folders: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    folders.iter().map(|folder| read_prompt(folder)).collect()
}

fn read_prompt(folder: &Path) -> Result<PromptFiles, FileError> {
    let id = folder
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    if !is_valid_name(&id) {
        return Err(file_error(
            folder,
            None,
            "a prompt folder's name is its id: letters, digits, `-`, `_` and `.`, up to 64",
        ));
    }
    let entries = std::fs::read_dir(folder).map_err(|e| file_error(folder, None, e.to_string()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    let mut versions = Vec::new();
    let mut labels = None;
    for path in paths {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".toml") else {
            continue;
        };
        if stem == "labels" {
            labels = Some(read_labels(&path)?);
        } else if let Some(number) = stem.strip_prefix('v').and_then(|n| n.parse::<u32>().ok()) {
            versions.push(read_version(&path, number)?);
        } else {
            return Err(file_error(
                &path,
                None,
                "a prompt folder holds `v<N>.toml` version files and `labels.toml`",
            ));
        }
    }
    versions.sort_by_key(|v| v.number);
    for pair in versions.windows(2) {
        if pair[0].number == pair[1].number {
            return Err(file_error(
                &pair[1].path,
                None,
                format!(
                    "version {} is also defined by {}",
                    pair[1].number,
                    pair[0].path.display()
                ),
            ));
        }
    }
    if let Some(labels) = &mut labels {
        for (label, target) in &mut labels.labels {
            // Validated as it will be stored (a missing salt becomes `ID/LABEL`).
            *target = target
                .clone()
                .validated(&id, label, |v| versions.iter().any(|f| f.number == v))
                .map_err(|e| {
                    let line = find_line(
                        &std::fs::read_to_string(&labels.path).unwrap_or_default(),
                        label,
                    );
                    file_error(&labels.path, line, format!("{label}: {e}"))
                })?;
        }
    }
    Ok(PromptFiles {
        id,
        versions,
        labels,
    })
}

fn read_text(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|e| file_error(path, None, e.to_string()))
}

fn toml_error(path: &Path, text: &str, error: &toml::de::Error) -> FileError {
    file_error(
        path,
        error.span().map(|span| line_of(text, span.start)),
        error.message().trim().to_owned(),
    )
}

pub fn read_version(path: &Path, number: u32) -> Result<FileVersion, FileError> {
    let text = read_text(path)?;
    let spec: VersionSpec = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
    if let Err(error) = CompiledVersion::compile(number, spec.clone()) {
        return Err(spec_file_error(path, &text, &error));
    }
    Ok(FileVersion {
        number,
        path: path.to_owned(),
        spec,
    })
}

/// Places a version's error in its file: a template error at the template's line, any other at
/// the line of the field it names.
fn spec_file_error(path: &Path, text: &str, error: &SpecError) -> FileError {
    #[derive(Deserialize)]
    struct Spans {
        #[serde(default)]
        messages: Vec<SpannedMessage>,
    }
    #[derive(Deserialize)]
    struct SpannedMessage {
        content: toml::Spanned<String>,
    }
    let message_index = error
        .field
        .strip_prefix("messages[")
        .and_then(|rest| rest.split(']').next())
        .and_then(|n| n.parse::<usize>().ok());
    let line = match message_index {
        Some(index) => toml::from_str::<Spans>(text)
            .ok()
            .and_then(|spans| spans.messages.into_iter().nth(index))
            .map(|m| {
                let start = line_of(text, m.content.span().start);
                // A `"""` string starting with a newline begins on the next line.
                let skip = usize::from(text[m.content.span().start..].starts_with("\"\"\"\n"));
                start + skip + error.template_line.unwrap_or(1) - 1
            }),
        None => error
            .field
            .rsplit('.')
            .next()
            .and_then(|name| find_line(text, name)),
    };
    file_error(path, line, error.to_string())
}

/// The first line that mentions `name` as a key or table name.
fn find_line(text: &str, name: &str) -> Option<usize> {
    text.lines()
        .position(|line| {
            let line = line.trim_start();
            line.starts_with(name)
                || line.contains(&format!(".{name}]"))
                || line.contains(&format!("[{name}]"))
        })
        .map(|i| i + 1)
}

fn read_labels(path: &Path) -> Result<FileLabels, FileError> {
    let text = read_text(path)?;
    let labels: BTreeMap<String, LabelTarget> =
        toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
    for label in labels.keys() {
        if !is_valid_name(label) {
            return Err(file_error(
                path,
                find_line(&text, label),
                format!("{label:?} is not a valid label name (letters, digits, `-`, `_`, `.`)"),
            ));
        }
    }
    Ok(FileLabels {
        path: path.to_owned(),
        hash: blake3::hash(text.as_bytes()).to_hex().to_string(),
        labels,
    })
}

/// A version as a file, for `reprise prompts export`.
pub fn version_to_toml(spec: &VersionSpec) -> Result<String, toml::ser::Error> {
    toml::to_string_pretty(spec)
}

pub fn labels_to_toml(labels: &BTreeMap<String, LabelTarget>) -> Result<String, toml::ser::Error> {
    toml::to_string_pretty(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    const V1: &str = r#"description = "Replies to a support question"
model = "chat"

[parameters]
temperature = 0.2

[variables.question]
type = "string"
free_text = true

[[messages]]
role = "system"
content = """
You are a support agent.
Be brief."""

[[messages]]
role = "user"
content = "{{ question }}"
"#;

    #[test]
    fn reads_versions_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "reply/v1.toml", V1);
        write(dir.path(), "reply/v2.toml", &V1.replace("brief", "kind"));
        write(
            dir.path(),
            "reply/labels.toml",
            "production = { version = 1 }\n[staging]\nrollout = [{ version = 1, weight = 50 }, { version = 2, weight = 50 }]\n",
        );
        write(dir.path(), "README.md", "not a prompt");
        let prompts = read_dir(dir.path()).unwrap();
        assert_eq!(prompts.len(), 1);
        assert_eq!(prompts[0].id, "reply");
        assert_eq!(prompts[0].versions.len(), 2);
        let labels = prompts[0].labels.as_ref().unwrap();
        assert_eq!(labels.labels["production"], LabelTarget::Version(1));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let cases = [
            (
                "v1.toml",
                V1.replace("role = \"user\"", "role = \"robot\""),
                18,
                "robot",
            ),
            (
                "v1.toml",
                V1.replace("Be brief.", "Be {{ tone }}."),
                15,
                "tone",
            ),
            (
                "v1.toml",
                V1.replace("Be brief.", "Be {% if %}."),
                15,
                "syntax",
            ),
            (
                "v1.toml",
                V1.replace("temperature = 0.2", "temperature = \"hot\""),
                5,
                "temperature",
            ),
            (
                "v1.toml",
                V1.replace(
                    "[[messages]]\nrole = \"user\"",
                    "[[messages]\nrole = \"user\"",
                ),
                17,
                "",
            ),
        ];
        for (name, text, line, says) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = write(dir.path(), &format!("reply/{name}"), &text);
            let error = read_dir(dir.path()).unwrap_err();
            assert_eq!(error.path, path);
            assert_eq!(error.line, Some(line), "{error}");
            assert!(error.to_string().contains(says), "{error}");
        }
    }

    #[test]
    fn labels_must_point_to_versions_and_sum_to_one_hundred() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "reply/v1.toml", V1);
        let labels = write(
            dir.path(),
            "reply/labels.toml",
            "production = { version = 1 }\nstaging = { version = 4 }\n",
        );
        let error = read_dir(dir.path()).unwrap_err();
        assert_eq!((error.path.clone(), error.line), (labels.clone(), Some(2)));
        assert!(error.message.contains("version 4"), "{error}");
        std::fs::write(
            &labels,
            "canary = { rollout = [{ version = 1, weight = 60 }], salt = \"x\" }\n",
        )
        .unwrap();
        let error = read_dir(dir.path()).unwrap_err();
        assert!(error.message.contains("sum to 100"), "{error}");
    }

    #[test]
    fn export_round_trips() {
        let spec: VersionSpec = toml::from_str(V1).unwrap();
        let text = version_to_toml(&spec).unwrap();
        let back: VersionSpec = toml::from_str(&text).unwrap();
        assert_eq!(back, spec);
        let mut labels = BTreeMap::new();
        labels.insert("production".to_owned(), LabelTarget::Version(1));
        let text = labels_to_toml(&labels).unwrap();
        assert_eq!(
            toml::from_str::<BTreeMap<String, LabelTarget>>(&text).unwrap(),
            labels
        );
    }
}
