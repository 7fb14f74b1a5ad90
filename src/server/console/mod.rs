//! The web console at `/console`: pages written here and embedded in the binary, nothing
//! fetched from elsewhere at run time.
//!
//! Sign-in takes the admin key once and answers with a session cookie (`HttpOnly`, so page
//! scripts cannot read it; `SameSite=Strict`, so other sites' pages do not send it). The
//! session is signed with a key derived from the admin key, so any replica with that key
//! accepts it and rotating the key ends every session. The page calls the admin API with the
//! cookie and the session's CSRF token in `x-reprise-csrf` (see [`super::auth`]); the token is
//! only ever written into the signed-in page, which a cross-site page cannot read.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use super::AppState;
use super::auth::{CONSOLE_COOKIE, CONSOLE_SESSION};

const LOGIN: &str = include_str!("login.html");
const APP: &str = include_str!("app.html");
const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// Scripts only from this origin, no framing, nothing cached.
fn page(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn login_page(status: StatusCode, error: &str) -> Response {
    page(
        status,
        "text/html; charset=utf-8",
        LOGIN.replace("{{error}}", error),
    )
}

/// `GET /console`: the console for a signed-in browser, else the sign-in form.
pub async fn index(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let Some(session) = state.auth.console_session(&headers) else {
        return login_page(StatusCode::OK, "");
    };
    let csrf = state.auth.csrf_token(&session).unwrap_or_default();
    page(
        StatusCode::OK,
        "text/html; charset=utf-8",
        APP.replace("{{csrf}}", &csrf),
    )
}

/// `POST /console/login` (form field `key`): a session cookie for the admin key.
pub async fn login(
    State(state): State<Arc<AppState>>,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return login_page(StatusCode::BAD_REQUEST, "Send the sign-in form.");
    };
    let key = form.get("key").map(String::as_str).unwrap_or_default();
    if !state.auth.is_admin_key(key) {
        return login_page(StatusCode::UNAUTHORIZED, "That is not the admin key.");
    }
    let Some(session) = state.auth.new_console_session() else {
        return login_page(StatusCode::FORBIDDEN, "This gateway has no admin key.");
    };
    let cookie = format!(
        "{CONSOLE_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        CONSOLE_SESSION.as_secs()
    );
    let mut response = Redirect::to("/console").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /console/logout` (form field `csrf`): ends the session.
pub async fn logout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    let form = form.map(|Form(form)| form).unwrap_or_default();
    if let Some(session) = state.auth.console_session(&headers) {
        let expected = state.auth.csrf_token(&session);
        if form.get("csrf") != expected.as_ref() {
            return login_page(StatusCode::FORBIDDEN, "Sign-out needs the page's token.");
        }
        state.auth.sign_out(&session);
    }
    let mut response = Redirect::to("/console").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("reprise_console=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

/// The page's script and style, for a signed-in browser only.
pub async fn asset(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if state.auth.console_session(&headers).is_none() {
        return StatusCode::NOT_FOUND.into_response();
    }
    match name.as_str() {
        "console.js" => page(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            SCRIPT.into(),
        ),
        "console.css" => page(StatusCode::OK, "text/css; charset=utf-8", STYLE.into()),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
