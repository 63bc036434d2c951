//! A single-node Apache Kafka 4.x broker on 127.0.0.1 in KRaft mode, where one process is both
//! broker and controller. Its helpers create topics and produce and consume records through
//! Kafka's own command-line tool classes, so tests need no Rust Kafka client.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::process::{ChildProcess, file_tail, run_peer_script};
use crate::{LaunchError, free_port};

/// Maximum wait for a started broker to list topics. Kafka 4.4.0 took 2.6 s to 4.9 s on an
/// idle 2-core machine with Java 17. The margin covers parallel builds and test binaries.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

const READY_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Time the broker gets to shut down after SIGTERM. It took about 2.5 s on the same machine.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Maximum run time of one command-line tool, such as creating a topic or formatting storage.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

const BROKER_HEAP: &str = "-Xmx512m";
const TOOL_HEAP: &str = "-Xmx256m";

const STORAGE_TOOL_CLASS: &str = "kafka.tools.StorageTool";
const BROKER_CLASS: &str = "kafka.Kafka";
const TOPIC_TOOL_CLASS: &str = "org.apache.kafka.tools.TopicCommand";
const CONSOLE_PRODUCER_CLASS: &str = "org.apache.kafka.tools.ConsoleProducer";
const CONSOLE_CONSUMER_CLASS: &str = "org.apache.kafka.tools.consumer.ConsoleConsumer";

/// Separator between key and value in the console producer's input and the console consumer's
/// output. A tab is the console consumer's default.
const KEY_SEPARATOR: char = '\t';

/// Log4j 2 configuration of the broker: INFO and above to standard output, which goes to the
/// broker's log file.
const BROKER_LOG4J2: &str = "\
rootLogger.level=INFO
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
";

/// Log4j 2 configuration of the tools: WARN and above to standard error, so that standard
/// output holds only what the tool prints (topic names, consumed records). Without a file, Log4j
/// 2 writes errors to standard output.
const TOOL_LOG4J2: &str = "\
rootLogger.level=WARN
rootLogger.appenderRef.stderr.ref=STDERR
appender.stderr.type=Console
appender.stderr.name=STDERR
appender.stderr.target=SYSTEM_ERR
appender.stderr.layout.type=PatternLayout
appender.stderr.layout.pattern=[%d] %p %m (%c)%n
";

/// Text that starts an ERROR message in the tools' log pattern, after the bracketed date.
const LOG4J_ERROR_MARKER: &str = "] ERROR ";

/// Failure of a Kafka command-line tool run against a running broker.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("{action} failed: the tool exited with {status}; stderr:\n{stderr}")]
    ToolFailed {
        action: String,
        status: ExitStatus,
        stderr: String,
    },

    #[error("sending records to {topic:?} failed: {first_error}; stderr:\n{stderr}")]
    SendFailed {
        topic: String,
        first_error: String,
        stderr: String,
    },

    #[error("{action} timed out after {waited:?}")]
    ToolTimedOut { action: String, waited: Duration },

    #[error("{action} failed: {source}")]
    Io {
        action: String,
        #[source]
        source: io::Error,
    },

    #[error("invalid record for the console producer: {reason}; record: {key:?} => {value:?}")]
    InvalidRecord {
        key: String,
        value: String,
        reason: &'static str,
    },

    #[error("invalid console consumer output line {line:?}: {reason}")]
    InvalidConsumerOutput { line: String, reason: &'static str },

    #[error("the broker is not running; call start_again first")]
    NotRunning,
}

/// Standard output and trimmed standard error of a tool that exited with status 0.
struct ToolOutput {
    stdout: String,
    stderr: String,
}

/// A record read back from a topic. `key` is `null` for a record without a key, because that is
/// how the console consumer prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub key: String,
    pub value: String,
}

impl ConsumedRecord {
    pub fn new(key: &str, value: &str) -> Self {
        ConsumedRecord {
            key: key.to_string(),
            value: value.to_string(),
        }
    }
}

/// Options of [`Kafka::start_with`].
#[derive(Debug, Clone, Default)]
pub struct KafkaOptions {
    /// Users (name, password) of an extra SASL_PLAINTEXT listener with the PLAIN mechanism.
    /// The listener is added only when this is not empty; the PLAINTEXT listener stays.
    pub sasl_plain_users: Vec<(String, String)>,
    /// An extra SSL listener that requires client certificates, when set.
    pub mtls: Option<KafkaMtls>,
}

/// Certificates of the SSL listener that [`KafkaOptions::mtls`] adds, in PEM.
#[derive(Debug, Clone)]
pub struct KafkaMtls {
    /// The broker's certificate chain; it must name 127.0.0.1, which clients verify.
    pub server_chain_pem: String,
    /// The broker's private key, unencrypted PKCS#8.
    pub server_key_pem: String,
    /// The CAs that client certificates must chain to.
    pub client_ca_pem: String,
}

/// A single-node Kafka broker on 127.0.0.1, killed when dropped.
pub struct Kafka {
    java: PathBuf,
    libs_dir: PathBuf,
    broker_port: u16,
    controller_port: u16,
    /// Port of the SASL_PLAINTEXT listener, when [`KafkaOptions::sasl_plain_users`] is set.
    sasl_port: Option<u16>,
    /// Port of the SSL listener, when [`KafkaOptions::mtls`] is set.
    ssl_port: Option<u16>,
    options: KafkaOptions,
    /// `None` after [`Kafka::stop`] or [`Kafka::kill`].
    process: Option<ChildProcess>,
    /// Number of broker starts, which names each start's log file.
    starts: u32,
    // Holds the configuration, the data and the logs until the broker is gone. Declared last so
    // that the process is killed before its folder is removed.
    work_dir: TempDir,
}

impl Kafka {
    /// Installs Kafka with `tests/peers/kafka.sh` (once per test process), writes a KRaft
    /// configuration for free loopback ports, formats the storage with a random cluster id,
    /// starts the broker and waits until it lists topics.
    ///
    /// Returns [`LaunchError::Unavailable`] when Kafka cannot be installed or Java cannot be
    /// run, so that callers can skip.
    pub async fn start() -> Result<Self, LaunchError> {
        Kafka::start_with(KafkaOptions::default()).await
    }

    /// Starts a broker with `options` for the test named `test`. Returns `None`, after
    /// reporting the skip, when Kafka is unavailable and peers are not required; panics on any
    /// other failure.
    pub async fn start_or_skip(test: &str, options: KafkaOptions) -> Option<Self> {
        match Kafka::start_with(options).await {
            Ok(kafka) => Some(kafka),
            Err(LaunchError::Unavailable { peer, reason }) if !crate::peers_required() => {
                crate::report_skip(test, &format!("{peer} is not available: {reason}"));
                None
            }
            Err(error) => panic!("{test}: starting Kafka failed: {error}"),
        }
    }

    /// Like [`Kafka::start`], with the listeners that `options` ask for.
    pub async fn start_with(options: KafkaOptions) -> Result<Self, LaunchError> {
        let libs_dir = kafka_libs_dir()?;
        let java = java_binary()?;

        let work_dir = tempfile::Builder::new()
            .prefix("portcullis-kafka-")
            .tempdir()
            .map_err(|source| LaunchError::io("creating Kafka's work folder", source))?;
        let broker_port = free_port()
            .map_err(|source| LaunchError::io("finding a free port for Kafka", source))?;
        let controller_port = free_port().map_err(|source| {
            LaunchError::io("finding a free port for Kafka's controller", source)
        })?;

        let sasl_port = if options.sasl_plain_users.is_empty() {
            None
        } else {
            Some(free_port().map_err(|source| {
                LaunchError::io("finding a free port for Kafka's SASL listener", source)
            })?)
        };

        let ssl_port = match options.mtls {
            None => None,
            Some(_) => Some(free_port().map_err(|source| {
                LaunchError::io("finding a free port for Kafka's SSL listener", source)
            })?),
        };

        let mut kafka = Kafka {
            java,
            libs_dir,
            broker_port,
            controller_port,
            sasl_port,
            ssl_port,
            options,
            process: None,
            starts: 0,
            work_dir,
        };
        kafka.write_configuration()?;
        kafka.format_storage().await?;
        kafka.launch().await?;
        Ok(kafka)
    }

    /// Returns `127.0.0.1:PORT` of the PLAINTEXT listener, the value of a client's
    /// `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.broker_address().to_string()
    }

    pub fn broker_address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.broker_port))
    }

    /// Returns `127.0.0.1:PORT` of the SASL_PLAINTEXT listener, or `None` when the broker was
    /// started without SASL users.
    pub fn sasl_bootstrap_servers(&self) -> Option<String> {
        self.sasl_port
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)).to_string())
    }

    /// Returns `127.0.0.1:PORT` of the SSL listener, or `None` when the broker was started
    /// without [`KafkaOptions::mtls`].
    pub fn ssl_bootstrap_servers(&self) -> Option<String> {
        self.ssl_port
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)).to_string())
    }

    /// Returns whether the broker process was started and not yet stopped or killed.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Returns the last lines of the current or latest broker log.
    pub fn log_tail(&self) -> String {
        match &self.process {
            Some(process) => process.log_tail(),
            None => file_tail(
                &self.broker_log_path(self.starts),
                crate::process::LOG_TAIL_LINES,
            ),
        }
    }

    /// Creates a topic with `partitions` partitions and replication factor 1.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<(), KafkaError> {
        self.ensure_running()?;
        let partitions = partitions.to_string();
        self.run_tool(
            &format!("creating the topic {name:?}"),
            TOPIC_TOOL_CLASS,
            &[
                "--bootstrap-server",
                &self.bootstrap_servers(),
                "--create",
                "--topic",
                name,
                "--partitions",
                &partitions,
                "--replication-factor",
                "1",
            ],
            None,
        )
        .await?;
        Ok(())
    }

    /// Sends `records` (key, value) in order with the console producer, which flushes them
    /// before it exits.
    ///
    /// The console producer reads one `KEY<TAB>VALUE` record per line and splits it at the first
    /// tab, so keys must not contain a tab, and neither keys nor values may contain a line break.
    pub async fn produce(&self, topic: &str, records: &[(&str, &str)]) -> Result<(), KafkaError> {
        self.ensure_running()?;
        let input = producer_input(records)?;
        let separator = KEY_SEPARATOR.to_string();
        let output = self
            .run_tool(
                &format!("producing {} records to {topic:?}", records.len()),
                CONSOLE_PRODUCER_CLASS,
                &[
                    "--bootstrap-server",
                    &self.bootstrap_servers(),
                    "--topic",
                    topic,
                    // Fails within 10 s instead of the default 60 s when the topic is missing.
                    "--producer-property",
                    "max.block.ms=10000",
                    "--reader-property",
                    "parse.key=true",
                    "--reader-property",
                    &format!("key.separator={separator}"),
                ],
                Some(input.as_bytes()),
            )
            .await?;
        // The console producer logs a failed send and still exits with status 0.
        if let Some(line) = output
            .stderr
            .lines()
            .find(|line| line.contains(LOG4J_ERROR_MARKER))
        {
            return Err(KafkaError::SendFailed {
                topic: topic.to_string(),
                first_error: line.to_string(),
                stderr: output.stderr,
            });
        }
        Ok(())
    }

    /// Reads `topic` from the beginning with the console consumer and returns its records.
    ///
    /// The consumer stops once no record has arrived for `idle_timeout` (its `--timeout-ms`),
    /// so the call takes that long plus the Java start and the consumer group join (together
    /// about 1.4 s on an idle 2-core machine). Records of one partition keep their order. A
    /// value that contains a line break is split across lines, which gives an error or wrong
    /// records.
    ///
    /// NOTE: `idle_timeout` also bounds the wait for the first record, including the group
    /// join, so a timeout of 1 s or less can return no records from a non-empty topic.
    pub async fn consume(
        &self,
        topic: &str,
        idle_timeout: Duration,
    ) -> Result<Vec<ConsumedRecord>, KafkaError> {
        self.ensure_running()?;
        let timeout_ms = idle_timeout.as_millis().to_string();
        let separator = KEY_SEPARATOR.to_string();
        let output = self
            .run_tool(
                &format!("reading {topic:?} with the console consumer"),
                CONSOLE_CONSUMER_CLASS,
                &[
                    "--bootstrap-server",
                    &self.bootstrap_servers(),
                    "--topic",
                    topic,
                    "--from-beginning",
                    "--timeout-ms",
                    &timeout_ms,
                    "--formatter-property",
                    "print.key=true",
                    "--formatter-property",
                    &format!("key.separator={separator}"),
                ],
                None,
            )
            .await?;
        parse_consumer_output(&output.stdout)
    }

    /// Sends SIGTERM and waits for the broker to shut down, which flushes its logs to disk.
    ///
    /// Fails when the broker is not running, has already exited or does not exit within 30 s.
    /// A broker that does not exit in time is killed.
    pub async fn stop(&mut self) -> Result<(), LaunchError> {
        let Some(mut process) = self.process.take() else {
            return Err(not_running_error());
        };
        process.send_sigterm()?;
        process.wait_for_exit(STOP_TIMEOUT).await?;
        Ok(())
    }

    /// Starts the broker again on the same ports with the same data, after [`Kafka::stop`] or
    /// [`Kafka::kill`], and waits until it lists topics.
    pub async fn start_again(&mut self) -> Result<(), LaunchError> {
        if self.process.is_some() {
            return Err(LaunchError::io(
                "starting Kafka again",
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("the broker on {} is still running", self.broker_address()),
                ),
            ));
        }
        self.launch().await
    }

    /// Kills the broker with SIGKILL and waits for it to exit. Does nothing when it is not
    /// running.
    pub fn kill(&mut self) {
        // Dropping the child process kills it and reaps it.
        self.process = None;
    }

    fn ensure_running(&self) -> Result<(), KafkaError> {
        if self.process.is_none() {
            return Err(KafkaError::NotRunning);
        }
        Ok(())
    }

    fn server_properties_path(&self) -> PathBuf {
        self.work_dir.path().join("server.properties")
    }

    fn broker_log4j2_path(&self) -> PathBuf {
        self.work_dir.path().join("broker-log4j2.properties")
    }

    fn tool_log4j2_path(&self) -> PathBuf {
        self.work_dir.path().join("tool-log4j2.properties")
    }

    fn broker_log_path(&self, start: u32) -> PathBuf {
        self.work_dir.path().join(format!("broker-{start}.log"))
    }

    fn write_configuration(&self) -> Result<(), LaunchError> {
        let data_dir = self.work_dir.path().join("data");
        let mut properties = server_properties(self.broker_port, self.controller_port, &data_dir);
        if let Some(sasl_port) = self.sasl_port {
            properties =
                with_sasl_plain_listener(&properties, sasl_port, &self.options.sasl_plain_users);
        }
        if let (Some(ssl_port), Some(mtls)) = (self.ssl_port, &self.options.mtls) {
            properties = with_mtls_listener(&properties, ssl_port, mtls);
        }
        let files = [
            (self.server_properties_path(), properties),
            (self.broker_log4j2_path(), BROKER_LOG4J2.to_string()),
            (self.tool_log4j2_path(), TOOL_LOG4J2.to_string()),
        ];
        for (path, contents) in files {
            fs::write(&path, contents)
                .map_err(|source| LaunchError::io(format!("writing {}", path.display()), source))?;
        }
        Ok(())
    }

    /// Formats the data folder as a single-voter KRaft cluster with a random cluster id.
    async fn format_storage(&self) -> Result<(), LaunchError> {
        let cluster_id = self.random_cluster_id().await?;
        let properties = self.server_properties_path();
        let log_path = self.work_dir.path().join("format.log");
        let mut command = self.java_command(TOOL_HEAP, &self.tool_log4j2_path());
        command
            .arg(STORAGE_TOOL_CLASS)
            .arg("format")
            .arg("--standalone")
            .arg("--cluster-id")
            .arg(&cluster_id)
            .arg("--config")
            .arg(&properties);
        let mut process =
            ChildProcess::spawn("kafka-storage-format", &mut command, &log_path, &log_path)?;
        let status = process.wait_for_exit(TOOL_TIMEOUT).await?;
        if !status.success() {
            return Err(LaunchError::ExitedEarly {
                name: "kafka-storage-format",
                status,
                log_tail: process.log_tail(),
            });
        }
        Ok(())
    }

    /// Returns a cluster id from `StorageTool random-uuid`, which prints a base64 UUID.
    async fn random_cluster_id(&self) -> Result<String, LaunchError> {
        let mut command =
            tokio::process::Command::from(self.java_command(TOOL_HEAP, &self.tool_log4j2_path()));
        command
            .arg(STORAGE_TOOL_CLASS)
            .arg("random-uuid")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(TOOL_TIMEOUT, command.output())
            .await
            .map_err(|_| {
                LaunchError::io(
                    "generating a Kafka cluster id",
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no exit after {TOOL_TIMEOUT:?}"),
                    ),
                )
            })?
            .map_err(|source| LaunchError::io("generating a Kafka cluster id", source))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let cluster_id = stdout.trim();
        if !output.status.success()
            || cluster_id.is_empty()
            || cluster_id.contains(char::is_whitespace)
        {
            return Err(LaunchError::io(
                "generating a Kafka cluster id",
                io::Error::other(format!(
                    "{STORAGE_TOOL_CLASS} random-uuid exited with {} and printed {stdout:?}; \
                     stderr: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                )),
            ));
        }
        Ok(cluster_id.to_string())
    }

    /// Starts the broker process and waits until it lists topics.
    async fn launch(&mut self) -> Result<(), LaunchError> {
        self.starts += 1;
        let log_path = self.broker_log_path(self.starts);
        let mut command = self.java_command(BROKER_HEAP, &self.broker_log4j2_path());
        command.arg(BROKER_CLASS).arg(self.server_properties_path());
        let mut process = ChildProcess::spawn("kafka", &mut command, &log_path, &log_path)?;

        let started = Instant::now();
        process
            .wait_until_ready(READY_TIMEOUT, READY_POLL_INTERVAL, || self.check_ready())
            .await?;
        report_progress(&format!(
            "Kafka ready on {} after {:.1} s",
            self.broker_address(),
            started.elapsed().as_secs_f64()
        ));
        self.process = Some(process);
        Ok(())
    }

    /// Succeeds once the PLAINTEXT port accepts connections and the topic tool can list topics,
    /// which needs a broker that has joined the metadata quorum.
    async fn check_ready(&self) -> Result<(), String> {
        TcpStream::connect(self.broker_address())
            .await
            .map_err(|error| format!("connecting to {} failed: {error}", self.broker_address()))?;
        self.run_tool(
            "listing topics",
            TOPIC_TOOL_CLASS,
            &["--bootstrap-server", &self.bootstrap_servers(), "--list"],
            None,
        )
        .await
        .map(|_| ())
        .map_err(|error| error.to_string())
    }

    /// Returns `java` with the heap option, the Log4j 2 configuration and the Kafka class path.
    fn java_command(&self, heap: &str, log4j2_path: &Path) -> std::process::Command {
        let mut command = std::process::Command::new(&self.java);
        command
            .arg(heap)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                log4j2_path.display()
            ))
            .arg("-cp")
            .arg(self.libs_dir.join("*"))
            .current_dir(self.work_dir.path());
        command
    }

    /// Runs a Kafka tool class with `args`, writes `stdin` to it, and returns its output when it
    /// exits with status 0.
    ///
    /// NOTE: the tool's stdout and stderr are read only after all of `stdin` is written. A tool
    /// that writes more than a pipe buffer (64 KiB on Linux) before reading all of a large input
    /// blocks, and the call then fails after the tool timeout.
    async fn run_tool(
        &self,
        action: &str,
        class: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<ToolOutput, KafkaError> {
        let io_error = |source| KafkaError::Io {
            action: action.to_string(),
            source,
        };
        let mut command =
            tokio::process::Command::from(self.java_command(TOOL_HEAP, &self.tool_log4j2_path()));
        command
            .arg(class)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(io_error)?;
        let stdin_pipe = child.stdin.take();

        let run = async move {
            if let (Some(mut pipe), Some(input)) = (stdin_pipe, stdin) {
                pipe.write_all(input).await?;
                // Closing stdin ends the console producer's input.
                drop(pipe);
            }
            child.wait_with_output().await
        };
        let output = tokio::time::timeout(TOOL_TIMEOUT, run)
            .await
            .map_err(|_| KafkaError::ToolTimedOut {
                action: action.to_string(),
                waited: TOOL_TIMEOUT,
            })?
            .map_err(io_error)?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if !output.status.success() {
            return Err(KafkaError::ToolFailed {
                action: action.to_string(),
                status: output.status,
                stderr,
            });
        }
        Ok(ToolOutput { stdout, stderr })
    }
}

/// Returns the broker configuration: one node that is both broker and controller, a PLAINTEXT
/// listener on `broker_port` and a controller listener on `controller_port`, both on 127.0.0.1.
///
/// Replication factors and `min.insync.replicas` are 1 because there is one broker. Topics are
/// never created on first use, so producing to a missing topic fails. The first consumer
/// group join is not delayed, so the console consumer starts reading at once.
pub fn server_properties(broker_port: u16, controller_port: u16, data_dir: &Path) -> String {
    format!(
        "\
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data_dir}
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
",
        data_dir = data_dir.display()
    )
}

/// Adds a SASL_PLAINTEXT listener on `sasl_port` to broker `properties`, accepting the PLAIN
/// mechanism for `users` (name, password). Brokers and controllers keep talking over the
/// PLAINTEXT and CONTROLLER listeners.
pub fn with_sasl_plain_listener(
    properties: &str,
    sasl_port: u16,
    users: &[(String, String)],
) -> String {
    let mut lines = with_listener(properties, "SASL_PLAINTEXT", sasl_port);
    let credentials: String = users
        .iter()
        .map(|(name, password)| format!(" user_{name}=\"{password}\""))
        .collect();
    lines.push("sasl.enabled.mechanisms=PLAIN".to_string());
    lines.push(format!(
        "listener.name.sasl_plaintext.plain.sasl.jaas.config=\
         org.apache.kafka.common.security.plain.PlainLoginModule required{credentials};"
    ));
    lines.join("\n") + "\n"
}

/// Returns the lines of broker `properties` with one more listener, named after its security
/// protocol (`SSL`, `SASL_PLAINTEXT`), on 127.0.0.1 `port`, listed first.
fn with_listener(properties: &str, protocol: &str, port: u16) -> Vec<String> {
    let listener = format!("{protocol}://127.0.0.1:{port}");
    properties
        .lines()
        .map(|line| {
            if let Some(rest) = line.strip_prefix("listeners=") {
                format!("listeners={listener},{rest}")
            } else if let Some(rest) = line.strip_prefix("advertised.listeners=") {
                format!("advertised.listeners={listener},{rest}")
            } else if let Some(rest) = line.strip_prefix("listener.security.protocol.map=") {
                format!("listener.security.protocol.map={protocol}:{protocol},{rest}")
            } else {
                line.to_string()
            }
        })
        .collect()
}

/// Adds an SSL listener on `ssl_port` to broker `properties` that presents the certificate of
/// `mtls` and requires client certificates chaining to its client CAs. The PEM texts are
/// written inline, with line ends escaped as Java properties files expect.
pub fn with_mtls_listener(properties: &str, ssl_port: u16, mtls: &KafkaMtls) -> String {
    let mut lines = with_listener(properties, "SSL", ssl_port);
    let inline = |pem: &str| pem.trim_end().replace('\n', "\\n");
    lines.push("listener.name.ssl.ssl.keystore.type=PEM".to_string());
    lines.push(format!(
        "listener.name.ssl.ssl.keystore.certificate.chain={}",
        inline(&mtls.server_chain_pem)
    ));
    lines.push(format!(
        "listener.name.ssl.ssl.keystore.key={}",
        inline(&mtls.server_key_pem)
    ));
    lines.push("listener.name.ssl.ssl.truststore.type=PEM".to_string());
    lines.push(format!(
        "listener.name.ssl.ssl.truststore.certificates={}",
        inline(&mtls.client_ca_pem)
    ));
    lines.push("listener.name.ssl.ssl.client.auth=required".to_string());
    lines.join("\n") + "\n"
}

/// Returns the console producer's input for `records`: one `KEY<TAB>VALUE` line each.
fn producer_input(records: &[(&str, &str)]) -> Result<String, KafkaError> {
    let mut input = String::new();
    for (key, value) in records {
        let invalid = |reason| KafkaError::InvalidRecord {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        if key.contains(KEY_SEPARATOR) {
            return Err(invalid(
                "the key contains a tab, which separates key and value",
            ));
        }
        if key.contains(['\n', '\r']) || value.contains(['\n', '\r']) {
            return Err(invalid("a line break would split the record"));
        }
        input.push_str(key);
        input.push(KEY_SEPARATOR);
        input.push_str(value);
        input.push('\n');
    }
    Ok(input)
}

/// Parses the console consumer's `KEY<TAB>VALUE` lines. The value is everything after the
/// first tab.
fn parse_consumer_output(stdout: &str) -> Result<Vec<ConsumedRecord>, KafkaError> {
    let mut records = Vec::new();
    for line in stdout.lines() {
        let Some((key, value)) = line.split_once(KEY_SEPARATOR) else {
            return Err(KafkaError::InvalidConsumerOutput {
                line: line.to_string(),
                reason: "no tab between key and value",
            });
        };
        records.push(ConsumedRecord::new(key, value));
    }
    Ok(records)
}

fn not_running_error() -> LaunchError {
    LaunchError::io(
        "stopping Kafka",
        io::Error::new(io::ErrorKind::NotFound, "the broker is not running"),
    )
}

/// Returns the folder of Kafka jars that `tests/peers/kafka.sh` installs, running the script at
/// most once per test process.
///
/// Returns [`LaunchError::Unavailable`] when the script fails, so that callers can skip.
pub fn kafka_libs_dir() -> Result<PathBuf, LaunchError> {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INSTALLED
        .get_or_init(install_kafka)
        .clone()
        .map_err(|reason| LaunchError::Unavailable {
            peer: "kafka",
            reason,
        })
}

fn install_kafka() -> Result<PathBuf, String> {
    let (libs_dir, stderr) = run_peer_script("kafka.sh")?;
    let has_broker_jar = fs::read_dir(&libs_dir).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("kafka_2.13-") && name.ends_with(".jar")
        })
    });
    if !has_broker_jar {
        return Err(format!(
            "kafka.sh printed {:?}, which has no kafka_2.13 jar; stderr: {stderr}",
            libs_dir.display()
        ));
    }
    Ok(libs_dir)
}

/// Returns `JAVA_HOME/bin/java` when `JAVA_HOME` is set, otherwise `java` from `PATH`, after
/// checking that it runs.
///
/// NOTE: the Java version is not checked. Kafka 4.x brokers need Java 17 or newer, and an
/// older Java fails when the storage is formatted, with its message in the error.
fn java_binary() -> Result<PathBuf, LaunchError> {
    let java = match std::env::var_os("JAVA_HOME") {
        Some(home) => PathBuf::from(home).join("bin").join("java"),
        None => PathBuf::from("java"),
    };
    let runs = std::process::Command::new(&java)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !runs {
        return Err(LaunchError::Unavailable {
            peer: "kafka",
            reason: format!(
                "{} -version failed; install Java 17 or newer or set JAVA_HOME",
                java.display()
            ),
        });
    }
    Ok(java)
}

/// Writes a progress line to the process's stderr, which libtest does not capture.
fn report_progress(line: &str) {
    use std::io::Write;
    // A failed write to stderr leaves nothing better to report to.
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_properties_bind_loopback_ports() {
        let properties = server_properties(9092, 9093, Path::new("/tmp/kafka-data"));
        let lines: Vec<&str> = properties.lines().collect();

        assert!(
            lines.contains(&"listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093")
        );
        assert!(lines.contains(
            &"advertised.listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
        ));
        assert!(lines.contains(&"controller.quorum.bootstrap.servers=127.0.0.1:9093"));
        assert!(lines.contains(&"log.dirs=/tmp/kafka-data"));
        assert!(lines.contains(&"auto.create.topics.enable=false"));
    }

    #[test]
    fn sasl_listener_is_added_before_the_others() {
        let base = server_properties(9092, 9093, Path::new("/tmp/kafka-data"));
        let users = [("audit".to_string(), "secret".to_string())];

        let properties = with_sasl_plain_listener(&base, 9094, &users);
        let lines: Vec<&str> = properties.lines().collect();

        assert!(lines.contains(
            &"listeners=SASL_PLAINTEXT://127.0.0.1:9094,PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
        ));
        assert!(lines.contains(
            &"listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        ));
        assert!(lines.contains(&"sasl.enabled.mechanisms=PLAIN"));
        assert!(lines.contains(
            &"listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_audit=\"secret\";"
        ));
        assert!(lines.contains(&"inter.broker.listener.name=PLAINTEXT"));
    }

    #[test]
    fn producer_input_is_one_line_per_record() {
        let input = producer_input(&[("k1", "v1"), ("k2", "{\"a\": 1}\tafter tab")]);

        assert_eq!(
            input.expect("valid records"),
            "k1\tv1\nk2\t{\"a\": 1}\tafter tab\n"
        );
    }

    #[test]
    fn producer_input_rejects_tab_in_key() {
        let error = producer_input(&[("k\t1", "v1")]).expect_err("a tab in a key must be rejected");

        assert_eq!(
            error.to_string(),
            "invalid record for the console producer: the key contains a tab, which separates \
             key and value; record: \"k\\t1\" => \"v1\""
        );
    }

    #[test]
    fn producer_input_rejects_newline_in_value() {
        let error =
            producer_input(&[("k1", "line\nbreak")]).expect_err("a newline must be rejected");

        assert!(
            matches!(
                error,
                KafkaError::InvalidRecord {
                    reason: "a line break would split the record",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn consumer_output_splits_at_first_tab() {
        let records = parse_consumer_output("k1\tv1\nnull\tvalue\twith tab\n");

        assert_eq!(
            records.expect("valid output"),
            vec![
                ConsumedRecord::new("k1", "v1"),
                ConsumedRecord::new("null", "value\twith tab"),
            ]
        );
    }

    #[test]
    fn consumer_output_of_empty_topic_is_empty() {
        assert_eq!(parse_consumer_output("").expect("valid output"), vec![]);
    }

    #[test]
    fn consumer_output_without_tab_is_rejected() {
        let error = parse_consumer_output("k1\tv1\nno separator\n")
            .expect_err("a line without a tab must be rejected");

        assert_eq!(
            error.to_string(),
            "invalid console consumer output line \"no separator\": no tab between key and value"
        );
    }
}
