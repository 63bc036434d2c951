#!/usr/bin/env bash
# Installs Apache Kafka 4.x from Maven Central and prints the folder that contains its jars on
# stdout. Starting the broker needs `java -cp 'FOLDER/*' kafka.Kafka server.properties`.
#
# The jars are org.apache.kafka:kafka_2.13 (the broker and kafka.tools.StorageTool) and
# org.apache.kafka:kafka-tools (TopicCommand, the console producer and consumer), with their
# runtime dependencies, SLF4J 2 and its Log4j 2 binding, copied by `mvn
# dependency:copy-dependencies` from a small pom generated in the cache folder.
#
# Usage: tests/peers/kafka.sh
#   PORTCULLIS_CACHE   cache folder (default: $HOME/.cache/portcullis)
#
# A second run with Kafka already installed prints only the folder. Progress and errors go to
# stderr; the exit status is non-zero when Kafka cannot be installed.
set -euo pipefail

KAFKA_VERSION='4.4.0'
# Kafka's poms leave logging to the application: they declare slf4j-api 1.7.36 at runtime and
# no binding. The broker logs through Log4j 2, which binds to SLF4J 2, so both are pinned here.
SLF4J_VERSION='2.0.17'
LOG4J_VERSION='2.24.3'

cache_dir="${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}"
kafka_dir="$cache_dir/kafka"
version_dir="$kafka_dir/$KAFKA_VERSION"
libs_dir="$version_dir/libs"
marker="$libs_dir/.complete"

fail() {
    echo "kafka.sh: $*" >&2
    exit 1
}

if [ -f "$marker" ]; then
    echo "$libs_dir"
    exit 0
fi

command -v mvn >/dev/null || fail "mvn not found; install Maven to download Kafka $KAFKA_VERSION"
mkdir -p "$version_dir" || fail "cannot create the cache folder $version_dir"

cat >"$version_dir/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>portcullis.tests</groupId>
  <artifactId>kafka-peer</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId>
      <artifactId>slf4j-api</artifactId>
      <version>$SLF4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j2-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF

echo "kafka.sh: downloading Kafka $KAFKA_VERSION jars into $libs_dir" >&2
rm -rf "$libs_dir"
mvn --batch-mode --quiet -Dstyle.color=never --file "$version_dir/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs_dir" >&2 \
    || fail "mvn dependency:copy-dependencies of org.apache.kafka:kafka_2.13:$KAFKA_VERSION failed (see the Maven output above)"

[ -f "$libs_dir/kafka_2.13-$KAFKA_VERSION.jar" ] \
    || fail "$libs_dir has no kafka_2.13-$KAFKA_VERSION.jar after the download"
[ -f "$libs_dir/kafka-tools-$KAFKA_VERSION.jar" ] \
    || fail "$libs_dir has no kafka-tools-$KAFKA_VERSION.jar after the download"

touch "$marker"
echo "kafka.sh: installed Kafka $KAFKA_VERSION ($(ls "$libs_dir"/*.jar | wc -l) jars)" >&2
echo "$libs_dir"
