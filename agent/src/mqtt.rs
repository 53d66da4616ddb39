//! The MQTT request/response client of fleet provisioning and rotation (SPEC §8): one
//! connection to the AWS IoT broker over the agent's own rustls configuration (so the claim key
//! and the device key may sit in PKCS#11), MQTT 3.1.1, clean session, QoS 1.
//!
//! [`MqttSession::connect`] opens the connection (TCP directly or through an HTTP CONNECT proxy,
//! TLS with the given client configuration, on port 443 with ALPN `x-amzn-mqtt-ca`) and waits
//! for CONNACK. [`MqttSession::call`] is one request of the fleet-provisioning API: subscribe to
//! `<topic>/accepted` and `<topic>/rejected`, publish the request to `<topic>`, wait for the
//! reply. Every wait is bounded by [`MqttTarget::timeout`].
//!
//! The session drives rumqttc's event loop itself (there is no background task): nothing
//! happens on the connection between calls except what `call` and `close` poll. An error ends
//! the session: rumqttc would reconnect on the next poll, which a request/response flow must
//! not do behind the caller's back.
//!
//! Errors never carry the request or reply payloads (CSRs, ownership tokens, certificates);
//! only AWS's `errorCode`/`errorMessage` of a rejection.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions,
    Outgoing, Packet, QoS, StateError, SubscribeFilter, SubscribeReasonCode, TlsConfiguration,
    Transport,
};
use rustls::ClientConfig;
use tokio::time::Instant;

use crate::connect::{Service, TlsFailure, closed_by_peer, tls_cause};
use crate::exit::Exit;
use crate::net::{Proxy, TlsServer};

/// The ALPN protocol AWS IoT expects for MQTT with client certificates on port 443.
pub const ALPN_MQTT_443: &[u8] = b"x-amzn-mqtt-ca";

/// Keep-alive of the connection. A provisioning or rotation flow lasts a few seconds; this only
/// matters for a broker that is slow to answer.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Largest MQTT packet sent or accepted: AWS IoT's message size limit (128 KiB) plus room for
/// the topic and the header.
const MAX_PACKET: usize = 128 * 1024 + 1024;

/// Capacity of the request channel between the client handle and the event loop: a call queues
/// at most one subscribe, one publish and a disconnect.
const REQUEST_CHANNEL: usize = 4;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct MqttTarget {
    /// The broker (`[provision] endpoint`, default port 8883).
    pub server: TlsServer,
    /// An HTTP CONNECT proxy, if any.
    pub proxy: Option<Proxy>,
    /// The MQTT client id.
    pub client_id: String,
    /// Bound of every wait: connection and CONNACK, SUBACK, PUBACK, the reply.
    pub timeout: Duration,
}

/// What a call was waiting for when it timed out or the connection closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// SUBACK of the subscription to the reply topics.
    Suback,
    /// PUBACK of the request.
    Puback,
    /// A message on `<topic>/accepted` or `<topic>/rejected`.
    Reply,
}

impl Waiting {
    fn what(self) -> &'static str {
        match self {
            Waiting::Suback => "SUBACK",
            Waiting::Puback => "PUBACK",
            Waiting::Reply => "the reply",
        }
    }
}

/// Why a connection or a call failed. `Display` says what to fix; nothing of the payloads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// TCP to the broker (or the name resolution) failed.
    #[error(
        "cannot connect to the MQTT broker at {target}: {source}; check [provision] endpoint, DNS and the network"
    )]
    Connect {
        /// host:port.
        target: String,
        /// Why.
        source: io::Error,
    },
    /// The proxy could not be reached or refused the tunnel.
    #[error("proxy {proxy} (to the MQTT broker at {target}): {message}")]
    Proxy {
        /// Proxy host:port.
        proxy: String,
        /// Broker host:port.
        target: String,
        /// What happened.
        message: String,
    },
    /// TLS failed (the handshake, or an alert after it).
    #[error(transparent)]
    Tls(#[from] TlsFailure),
    /// Nothing from the broker within the bound while connecting.
    #[error(
        "no CONNACK from the MQTT broker at {target} within {seconds} s: check [provision] endpoint, the network and the proxy, or raise [provision] timeout_seconds"
    )]
    ConnectTimeout {
        /// host:port.
        target: String,
        /// The bound.
        seconds: u64,
    },
    /// CONNACK with a refusal code.
    #[error(
        "the MQTT broker at {target} refused the connection (CONNACK return code {code}: {reason}){hint}"
    )]
    Refused {
        /// host:port.
        target: String,
        /// The return code.
        code: u8,
        /// Its meaning.
        reason: &'static str,
        /// What to check.
        hint: &'static str,
    },
    /// The broker closed the connection before CONNACK.
    #[error(
        "the MQTT broker at {target} closed the connection before CONNACK: the certificate's policy may deny iot:Connect for client id \"{client_id}\", or another connection uses the same client id"
    )]
    ClosedBeforeConnack {
        /// host:port.
        target: String,
        /// The client id sent.
        client_id: String,
    },
    /// The broker closed the connection during a call.
    #[error("the MQTT broker closed the connection while waiting for {} on {topic}: {}", .waiting_for.what(), closed_hint(*.waiting_for, topic))]
    Closed {
        /// The request topic.
        topic: String,
        /// What the call was waiting for.
        waiting_for: Waiting,
    },
    /// The broker refused a subscription in its SUBACK.
    #[error(
        "the MQTT broker refused the subscription to {filter}: the policy must allow iot:Subscribe on the topic filter {filter} (and iot:Receive on the topic)"
    )]
    SubscribeRefused {
        /// The topic filter refused.
        filter: String,
    },
    /// No answer within the bound.
    #[error("{}", timeout_message(topic, *.waiting_for, *.seconds))]
    Timeout {
        /// The request topic.
        topic: String,
        /// What the call was waiting for.
        waiting_for: Waiting,
        /// The bound.
        seconds: u64,
    },
    /// AWS rejected the request (a message on `<topic>/rejected`).
    #[error("{topic}/rejected: {}{error_code}: {error_message}", status_code.map(|c| format!("{c} ")).unwrap_or_default())]
    Rejected {
        /// The request topic.
        topic: String,
        /// AWS's `statusCode`.
        status_code: Option<u16>,
        /// AWS's `errorCode`.
        error_code: String,
        /// AWS's `errorMessage`.
        error_message: String,
    },
    /// The reply is not what AWS sends.
    #[error("malformed reply on {topic}: {detail}")]
    Malformed {
        /// The reply topic.
        topic: String,
        /// What is wrong (never the payload).
        detail: String,
    },
    /// Any other MQTT or I/O failure of the connection.
    #[error("MQTT connection to {target}: {detail}")]
    Protocol {
        /// host:port.
        target: String,
        /// What happened (never a payload).
        detail: String,
    },
}

fn closed_hint(waiting: Waiting, topic: &str) -> String {
    match waiting {
        Waiting::Suback => format!(
            "a policy that denies iot:Subscribe on {topic}/accepted or {topic}/rejected can close the connection"
        ),
        Waiting::Puback | Waiting::Reply => format!(
            "a policy that denies iot:Publish on {topic} (or iot:Subscribe/iot:Receive on {topic}/accepted and /rejected) can close the connection"
        ),
    }
}

fn timeout_message(topic: &str, waiting: Waiting, seconds: u64) -> String {
    match waiting {
        Waiting::Suback => format!(
            "no SUBACK for {topic}/accepted and /rejected within {seconds} s: check the network, or raise [provision] timeout_seconds"
        ),
        Waiting::Puback => format!(
            "no PUBACK for the request on {topic} within {seconds} s: the usual cause is a policy that denies iot:Publish on {topic}"
        ),
        Waiting::Reply => format!(
            "no reply on {topic}/accepted or /rejected within {seconds} s: the usual cause is a policy that denies iot:Publish on {topic} or iot:Subscribe/iot:Receive on its reply topics (a broker may drop a denied publish silently)"
        ),
    }
}

impl MqttError {
    /// The exit code (SPEC §5): a rejection by AWS is permanent (3), everything else
    /// transient (4).
    pub fn exit(&self) -> Exit {
        match self {
            MqttError::Rejected { .. } => Exit::Permanent,
            _ => Exit::Transient,
        }
    }
}

/// One MQTT connection to the broker.
pub struct MqttSession {
    client: AsyncClient,
    eventloop: EventLoop,
    target: String,
    timeout: Duration,
    /// Set after a connection error: the event loop must not be polled again (it would
    /// reconnect).
    broken: bool,
}

impl fmt::Debug for MqttSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSession")
            .field("target", &self.target)
            .field("timeout", &self.timeout)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// The TLS configuration for `port`: on 443 a copy with ALPN `x-amzn-mqtt-ca` (AWS IoT serves
/// MQTT there only with that ALPN), else `tls` itself.
pub fn tls_for_port(tls: Arc<ClientConfig>, port: u16) -> Arc<ClientConfig> {
    if port == 443 {
        let mut c = (*tls).clone();
        c.alpn_protocols = vec![ALPN_MQTT_443.to_vec()];
        Arc::new(c)
    } else {
        tls
    }
}

/// rumqttc's form of our proxy: plain HTTP CONNECT, no credentials. IPv6 addresses keep their
/// brackets, since rumqttc dials `"{addr}:{port}"`.
fn rumqttc_proxy(p: &Proxy) -> rumqttc::Proxy {
    let host = p.addr.host();
    rumqttc::Proxy {
        ty: rumqttc::ProxyType::Http,
        auth: rumqttc::ProxyAuth::None,
        addr: if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        },
        port: p.addr.port(),
    }
}

/// The seconds of a bound, for messages and rumqttc's whole-second settings (at least 1).
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl MqttSession {
    /// Connects: TCP (direct or through the HTTP CONNECT proxy), TLS with `tls` (which holds the
    /// client certificate), MQTT CONNECT with a clean session; waits for CONNACK. Bounded by
    /// `target.timeout`.
    pub async fn connect(
        target: &MqttTarget,
        tls: Arc<ClientConfig>,
    ) -> Result<MqttSession, MqttError> {
        let addr = target.server.addr();
        let mut options = MqttOptions::new(target.client_id.clone(), addr.host(), addr.port());
        options
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_request_channel_capacity(REQUEST_CHANNEL)
            .set_inflight(REQUEST_CHANNEL as u16)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls_for_port(tls, addr.port()),
            )));
        if let Some(p) = &target.proxy {
            options.set_proxy(rumqttc_proxy(p));
        }
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
        let seconds = whole_seconds(target.timeout);
        let mut net = NetworkOptions::new();
        net.set_connection_timeout(seconds.max(1));
        // Request/response in small packets: without this, a SUBSCRIBE waits behind the
        // unacknowledged PUBACK of the previous reply (Nagle + delayed ACK, ~40 ms a step).
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);

        let target_s = target.server.to_string();
        let timeout_err = || MqttError::ConnectTimeout {
            target: target_s.clone(),
            seconds,
        };
        let deadline = Instant::now() + target.timeout;
        loop {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Err(_) | Ok(Err(ConnectionError::NetworkTimeout)) => return Err(timeout_err()),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(connect_error(e, target)),
            }
        }
        tracing::debug!(target = %target_s, client_id = %target.client_id, "MQTT connected");
        Ok(MqttSession {
            client,
            eventloop,
            target: target_s,
            timeout: target.timeout,
            broken: false,
        })
    }

    /// One request of the fleet-provisioning API: subscribes (QoS 1) to `<topic>/accepted` and
    /// `<topic>/rejected` and waits for SUBACK, publishes `payload` (QoS 1) to `topic` and waits
    /// for PUBACK, then waits for a message on either reply topic (messages on other topics are
    /// ignored). Each wait is bounded by the target's timeout.
    ///
    /// Accepted: the reply's JSON object. Rejected: [`MqttError::Rejected`] with AWS's fields.
    pub async fn call(
        &mut self,
        topic: &str,
        payload: &serde_json::Value,
    ) -> Result<serde_json::Value, MqttError> {
        if self.broken {
            return Err(MqttError::Protocol {
                target: self.target.clone(),
                detail: "the connection was lost earlier; connect again".into(),
            });
        }
        let accepted = format!("{topic}/accepted");
        let rejected = format!("{topic}/rejected");
        let mut reply: Option<(bool, bytes::Bytes)> = None;

        // Subscribe first, so the reply cannot come before the subscription.
        let filters =
            [&accepted, &rejected].map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        if self.client.try_subscribe_many(filters).is_err() {
            return Err(self.request_refused(topic, "subscribe"));
        }
        let deadline = Instant::now() + self.timeout;
        let mut pkid = None;
        let codes = loop {
            match self.next(deadline, topic, Waiting::Suback).await? {
                Event::Outgoing(Outgoing::Subscribe(p)) => pkid = Some(p),
                Event::Incoming(Packet::SubAck(ack)) if Some(ack.pkid) == pkid => {
                    break ack.return_codes;
                }
                ev => note_reply(&ev, &accepted, &rejected, &mut reply),
            }
        };
        for (filter, code) in [&accepted, &rejected]
            .into_iter()
            .zip(codes.iter().map(Some).chain(std::iter::repeat(None)))
        {
            if !matches!(code, Some(SubscribeReasonCode::Success(_))) {
                return Err(MqttError::SubscribeRefused {
                    filter: filter.clone(),
                });
            }
        }

        // Publish the request, wait for its PUBACK.
        if self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload.to_string())
            .is_err()
        {
            return Err(self.request_refused(topic, "publish"));
        }
        let deadline = Instant::now() + self.timeout;
        let mut pkid = None;
        loop {
            match self.next(deadline, topic, Waiting::Puback).await? {
                Event::Outgoing(Outgoing::Publish(p)) => pkid = Some(p),
                Event::Incoming(Packet::PubAck(ack)) if Some(ack.pkid) == pkid => break,
                ev => note_reply(&ev, &accepted, &rejected, &mut reply),
            }
        }

        // The reply (it may have come before the PUBACK).
        let deadline = Instant::now() + self.timeout;
        let (ok, body) = loop {
            if let Some(r) = reply.take() {
                break r;
            }
            let ev = self.next(deadline, topic, Waiting::Reply).await?;
            note_reply(&ev, &accepted, &rejected, &mut reply);
        };
        if ok {
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) if v.is_object() => Ok(v),
                Ok(_) => Err(MqttError::Malformed {
                    topic: accepted,
                    detail: "the reply is not a JSON object".into(),
                }),
                Err(e) => Err(MqttError::Malformed {
                    topic: accepted,
                    detail: format!(
                        "the reply is not JSON (at line {}, column {})",
                        e.line(),
                        e.column()
                    ),
                }),
            }
        } else {
            Err(rejection(topic, &body))
        }
    }

    /// Sends DISCONNECT and drops the connection. Bounded (by the target's timeout, at most
    /// 5 s); never fails loudly.
    pub async fn close(mut self) {
        if self.broken || self.client.try_disconnect().is_err() {
            return;
        }
        let deadline = Instant::now() + self.timeout.min(Duration::from_secs(5));
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(target = %self.target, error = %e, "MQTT disconnect");
                    break;
                }
                Err(_) => {
                    tracing::debug!(target = %self.target, "MQTT disconnect timed out");
                    break;
                }
            }
        }
    }

    /// The next event of the connection, before `deadline`.
    async fn next(
        &mut self,
        deadline: Instant,
        topic: &str,
        waiting_for: Waiting,
    ) -> Result<Event, MqttError> {
        match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
            Ok(Ok(ev)) => Ok(ev),
            Ok(Err(e)) => {
                self.broken = true;
                Err(call_error(e, &self.target, topic, waiting_for))
            }
            Err(_) => {
                self.broken = true;
                Err(MqttError::Timeout {
                    topic: topic.to_owned(),
                    waiting_for,
                    seconds: whole_seconds(self.timeout),
                })
            }
        }
    }

    /// The request channel refused a request (a topic rumqttc finds invalid, or a full
    /// channel). The request itself is not shown: it may hold secrets.
    fn request_refused(&self, topic: &str, what: &str) -> MqttError {
        MqttError::Protocol {
            target: self.target.clone(),
            detail: format!("cannot {what} on {topic}: not a valid topic (no + or #)"),
        }
    }
}

/// Keeps the first message on a reply topic.
fn note_reply(
    ev: &Event,
    accepted: &str,
    rejected: &str,
    reply: &mut Option<(bool, bytes::Bytes)>,
) {
    if let Event::Incoming(Packet::Publish(p)) = ev {
        let ok = if p.topic == accepted {
            true
        } else if p.topic == rejected {
            false
        } else {
            tracing::debug!(topic = %p.topic, "MQTT message on another topic ignored");
            return;
        };
        if reply.is_none() {
            *reply = Some((ok, p.payload.clone()));
        }
    }
}

/// `MqttError::Rejected` from a `/rejected` payload:
/// `{"statusCode":400,"errorCode":"InvalidCSR","errorMessage":"…"}`.
fn rejection(topic: &str, body: &[u8]) -> MqttError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let (error_code, error_message) = match (text("errorCode"), text("errorMessage")) {
        (None, None) => (
            String::new(),
            "the rejection carries no errorCode/errorMessage".to_owned(),
        ),
        (c, m) => (c.unwrap_or_default(), m.unwrap_or_default()),
    };
    MqttError::Rejected {
        topic: topic.to_owned(),
        status_code: v
            .get("statusCode")
            .and_then(serde_json::Value::as_u64)
            .and_then(|c| u16::try_from(c).ok()),
        error_code,
        error_message,
    }
}

/// The first I/O error in the chain of `e`.
fn io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a io::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// A TLS failure (an I/O error carrying rustls' reason) anywhere in the chain of `e`.
fn tls_failure(e: &ConnectionError, target: &str) -> Option<TlsFailure> {
    let io = io_error(e)?;
    tls_cause(io)?;
    Some(TlsFailure {
        service: Service::Mqtt,
        target: target.to_owned(),
        // The rustls error again, in an io::Error of our own (`TlsFailure` owns its source).
        source: io::Error::new(io.kind(), tls_cause(io)?.clone()),
    })
}

fn connect_error(e: ConnectionError, target: &MqttTarget) -> MqttError {
    let t = target.server.to_string();
    if let Some(f) = tls_failure(&e, &t) {
        return MqttError::Tls(f);
    }
    match e {
        ConnectionError::Io(source) => MqttError::Connect { target: t, source },
        ConnectionError::Proxy(p) => MqttError::Proxy {
            proxy: target
                .proxy
                .as_ref()
                .map(|p| p.addr.to_string())
                .unwrap_or_default(),
            target: t,
            // rumqttc's words: "Socket connect: …" (the proxy is unreachable) or
            // "Proxy connect: The HTTP code is not equal 200: 403" (refused).
            message: p.to_string(),
        },
        ConnectionError::Tls(e) => MqttError::Tls(TlsFailure {
            service: Service::Mqtt,
            target: t,
            source: match e {
                rumqttc::TlsError::Io(io) => io,
                other => io::Error::other(other.to_string()),
            },
        }),
        ConnectionError::ConnectionRefused(code) => {
            let (reason, hint) = refusal(code);
            MqttError::Refused {
                target: t,
                code: code as u8,
                reason,
                hint,
            }
        }
        ConnectionError::MqttState(StateError::ConnectionAborted) => {
            MqttError::ClosedBeforeConnack {
                target: t,
                client_id: target.client_id.clone(),
            }
        }
        ConnectionError::MqttState(ref s) if io_error(s).is_some_and(closed_by_peer) => {
            MqttError::ClosedBeforeConnack {
                target: t,
                client_id: target.client_id.clone(),
            }
        }
        ConnectionError::NotConnAck(p) => MqttError::Protocol {
            target: t,
            detail: format!("expected CONNACK, got {}", packet_kind(&p)),
        },
        other => MqttError::Protocol {
            target: t,
            detail: safe_detail(&other),
        },
    }
}

fn call_error(e: ConnectionError, target: &str, topic: &str, waiting_for: Waiting) -> MqttError {
    if let Some(f) = tls_failure(&e, target) {
        return MqttError::Tls(f);
    }
    let closed = match &e {
        ConnectionError::MqttState(StateError::ConnectionAborted) => true,
        ConnectionError::MqttState(s) => io_error(s).is_some_and(closed_by_peer),
        ConnectionError::Io(io) => closed_by_peer(io),
        _ => false,
    };
    if closed {
        return MqttError::Closed {
            topic: topic.to_owned(),
            waiting_for,
        };
    }
    MqttError::Protocol {
        target: target.to_owned(),
        detail: format!(
            "{} (while waiting for {} on {topic})",
            safe_detail(&e),
            waiting_for.what()
        ),
    }
}

/// A connection error in words, without anything that could hold a payload (rumqttc's
/// `NotConnAck` carries the packet).
fn safe_detail(e: &ConnectionError) -> String {
    match e {
        ConnectionError::NotConnAck(p) => format!("expected CONNACK, got {}", packet_kind(p)),
        ConnectionError::MqttState(StateError::AwaitPingResp) => {
            "no PINGRESP from the broker within the keep-alive".into()
        }
        other => other.to_string(),
    }
}

fn packet_kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// The meaning of a CONNACK refusal and what to check.
fn refusal(code: ConnectReturnCode) -> (&'static str, &'static str) {
    match code {
        ConnectReturnCode::Success => ("accepted", ""),
        ConnectReturnCode::RefusedProtocolVersion => (
            "unacceptable protocol version",
            ": the broker does not speak MQTT 3.1.1; check [provision] endpoint",
        ),
        ConnectReturnCode::BadClientId => ("identifier rejected", ": check [provision] client_id"),
        ConnectReturnCode::ServiceUnavailable => ("server unavailable", ": try again later"),
        ConnectReturnCode::BadUserNamePassword => (
            "bad user name or password",
            ": check that the certificate is registered and ACTIVE in AWS IoT",
        ),
        ConnectReturnCode::NotAuthorized => (
            "not authorized",
            ": check that the certificate is ACTIVE and its policy allows iot:Connect for the client id",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    }

    #[test]
    fn alpn_only_on_443() {
        let tls = config();
        let on_8883 = tls_for_port(tls.clone(), 8883);
        assert!(Arc::ptr_eq(&on_8883, &tls));
        assert!(on_8883.alpn_protocols.is_empty());
        let on_443 = tls_for_port(tls.clone(), 443);
        assert!(!Arc::ptr_eq(&on_443, &tls));
        assert_eq!(on_443.alpn_protocols, vec![b"x-amzn-mqtt-ca".to_vec()]);
        assert!(tls.alpn_protocols.is_empty(), "the original is unchanged");
    }

    #[test]
    fn proxy_mapping() {
        let p = rumqttc_proxy(&Proxy::parse("http://proxy.example:3129").unwrap());
        assert_eq!((p.addr.as_str(), p.port), ("proxy.example", 3129));
        assert!(matches!(p.ty, rumqttc::ProxyType::Http));
        assert!(matches!(p.auth, rumqttc::ProxyAuth::None));
        let p = rumqttc_proxy(&Proxy::parse("http://[::1]:8080").unwrap());
        assert_eq!((p.addr.as_str(), p.port), ("[::1]", 8080));
    }

    #[test]
    fn rejection_fields_and_exit() {
        let e = rejection(
            "$aws/certificates/create-from-csr/json",
            br#"{"statusCode":400,"errorCode":"InvalidCSR","errorMessage":"bad CSR"}"#,
        );
        let MqttError::Rejected {
            status_code,
            ref error_code,
            ref error_message,
            ..
        } = e
        else {
            panic!("{e:?}")
        };
        assert_eq!(status_code, Some(400));
        assert_eq!(error_code, "InvalidCSR");
        assert_eq!(error_message, "bad CSR");
        assert_eq!(e.exit(), Exit::Permanent);
        assert_eq!(
            e.to_string(),
            "$aws/certificates/create-from-csr/json/rejected: 400 InvalidCSR: bad CSR"
        );
        let e = rejection("t", b"not json");
        assert!(
            matches!(
                e,
                MqttError::Rejected {
                    status_code: None,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.exit(), Exit::Permanent);
    }

    #[test]
    fn timeout_names_topic_and_policy() {
        let e = MqttError::Timeout {
            topic: "$aws/provisioning-templates/T/provision/json".into(),
            waiting_for: Waiting::Reply,
            seconds: 10,
        };
        let s = e.to_string();
        assert!(s.contains("no reply on $aws/provisioning-templates/T/provision/json/accepted or /rejected within 10 s"), "{s}");
        assert!(
            s.contains("iot:Publish on $aws/provisioning-templates/T/provision/json"),
            "{s}"
        );
        assert!(s.contains("iot:Subscribe/iot:Receive"), "{s}");
        assert_eq!(e.exit(), Exit::Transient);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
    }
}
