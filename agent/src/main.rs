//! `iotcred`: AWS IoT credentials agent for edge gateways.
// Doc comments on the CLI types are `--help` text, not rustdoc: brackets there are literal.
#![allow(rustdoc::broken_intra_doc_links)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use iotcred_agent::commands;
use iotcred_core::render::Format;

/// The C library's `pow`, from the `libm` crate (a port of musl's), linked into the binary.
///
/// The only caller in the whole binary is tokio's multi-thread scheduler (an exponentially
/// weighted average of task poll times). Without this definition that one function makes the
/// dynamic loader map all of libm.so.6 and search its symbol tables for every other import at
/// start-up: about 0.5 MiB of resident memory in an idle agent and one more library to load
/// for every `fetch`. With it, the linker (`--as-needed`) drops libm from the binary's
/// dependencies.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[derive(Parser, Debug)]
#[command(
    name = "iotcred",
    version,
    about = "Trades the device's X.509 identity for temporary AWS credentials (AWS IoT credentials provider) and hands them to local apps",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent in the foreground (systemd Type=notify).
    Run {
        /// Configuration file [default: $IOTCRED_CONFIG or /etc/iotcred/config.toml]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Validate configuration, certificate chain and key access; --fetch also does one exchange.
    Check {
        /// Configuration file [default: $IOTCRED_CONFIG or /etc/iotcred/config.toml]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Also fetch credentials once for every role (prints expiry and the access key id's last 4 characters).
        #[arg(long)]
        fetch: bool,
    },
    /// Fetch credentials once, without an agent, and print them.
    Fetch {
        /// Configuration file [default: $IOTCRED_CONFIG or /etc/iotcred/config.toml]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Role name [default: the first [[role]]]
        #[arg(long, value_name = "NAME")]
        role: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutFormat::Json)]
        format: OutFormat,
    },
    /// Ask the running agent for credentials over its Unix socket.
    Get {
        /// Agent socket [default: $IOTCRED_SOCKET, else [serve] socket of the config, else /run/iotcred/agent.sock]
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Role name [default: the agent's default role]
        #[arg(long, value_name = "NAME")]
        role: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = OutFormat::Json)]
        format: OutFormat,
    },
    /// `get --format credential-process`, for `credential_process = iotcred credential-process --role NAME`.
    CredentialProcess {
        /// Agent socket [default: $IOTCRED_SOCKET, else [serve] socket of the config, else /run/iotcred/agent.sock]
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Role name [default: the agent's default role]
        #[arg(long, value_name = "NAME")]
        role: Option<String>,
    },
    /// Fleet provisioning by claim over MQTT: make the device key, certificate and thing (does nothing on a provisioned device).
    Provision {
        /// Configuration file [default: $IOTCRED_CONFIG or /etc/iotcred/config.toml]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Only check the config, the claim certificate and key, and the MQTT connection.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace the device certificate and key now if expiry is within [rotation] before_days.
    Rotate {
        /// Configuration file [default: $IOTCRED_CONFIG or /etc/iotcred/config.toml]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Rotate even if expiry is not near.
        #[arg(long)]
        force: bool,
    },
    /// Generate a device key (in a PKCS#11 token, or a 0600 PEM file) and a PKCS#10 CSR.
    Keygen {
        /// pkcs11: URI (RFC 7512) or PEM file path for the new key.
        #[arg(long, value_name = "URI_OR_PATH")]
        key: String,
        /// Subject DN of the CSR, e.g. "CN=gateway-0042,O=Example".
        #[arg(long, value_name = "DN")]
        subject: String,
        /// Key algorithm.
        #[arg(long, value_enum, default_value_t = Algorithm::EcP256)]
        algorithm: Algorithm,
        /// Write the CSR here [default: standard output].
        #[arg(long, value_name = "PATH")]
        csr_out: Option<PathBuf>,
        /// Replace (destroy) an existing key with the same label/id, or an existing key file.
        #[arg(long)]
        overwrite: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OutFormat {
    Json,
    CredentialProcess,
    Env,
    Ini,
}

impl From<OutFormat> for Format {
    fn from(f: OutFormat) -> Format {
        match f {
            OutFormat::Json => Format::ContainerJson,
            OutFormat::CredentialProcess => Format::CredentialProcess,
            OutFormat::Env => Format::Env,
            OutFormat::Ini => Format::Ini,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Algorithm {
    EcP256,
    Rsa2048,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run { config } => {
            commands::init_logging("info");
            commands::run(config.as_deref())
        }
        Command::Check { config, fetch } => {
            commands::init_logging("warn");
            commands::check(config.as_deref(), fetch)
        }
        Command::Fetch {
            config,
            role,
            format,
        } => {
            commands::init_logging("warn");
            commands::fetch(config.as_deref(), role.as_deref(), format.into())
        }
        Command::Get {
            socket,
            role,
            format,
        } => commands::get(socket.as_deref(), role.as_deref(), format.into()),
        Command::CredentialProcess { socket, role } => commands::get(
            socket.as_deref(),
            role.as_deref(),
            Format::CredentialProcess,
        ),
        Command::Provision { config, dry_run } => {
            commands::init_logging("info");
            commands::provision(config.as_deref(), dry_run)
        }
        Command::Rotate { config, force } => {
            commands::init_logging("info");
            commands::rotate(config.as_deref(), force)
        }
        Command::Keygen {
            key,
            subject,
            algorithm,
            csr_out,
            overwrite,
        } => {
            commands::init_logging("warn");
            let alg = match algorithm {
                Algorithm::EcP256 => iotcred_agent::keys::Algorithm::EcP256,
                Algorithm::Rsa2048 => iotcred_agent::keys::Algorithm::Rsa2048,
            };
            commands::keygen(&key, &subject, alg, csr_out.as_deref(), overwrite)
        }
    };
    code.into()
}
