// The AWS SDK for Go v2 (Debian's golang-github-aws-aws-sdk-go-v2-dev, built in GOPATH mode) as an
// unmodified consumer of iotcred.
//
//	iotcred-go-consumer ec2                    ec2rolecreds: IMDSv2 at AWS_EC2_METADATA_SERVICE_ENDPOINT
//	iotcred-go-consumer endpoint URL TOKENFILE  endpointcreds: the container-credentials API, with the token
//
// Prints one JSON line: the credentials the provider resolved, or {"error": "..."}.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	"github.com/aws/aws-sdk-go-v2/credentials/endpointcreds"
)

func main() {
	out := map[string]interface{}{}
	if err := run(out); err != nil {
		out = map[string]interface{}{"error": err.Error()}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}

func run(out map[string]interface{}) error {
	if len(os.Args) < 2 {
		return fmt.Errorf("usage: iotcred-go-consumer ec2 | endpoint URL TOKENFILE")
	}
	var p aws.CredentialsProvider
	switch os.Args[1] {
	case "ec2":
		p = ec2rolecreds.New()
	case "endpoint":
		if len(os.Args) != 4 {
			return fmt.Errorf("usage: iotcred-go-consumer endpoint URL TOKENFILE")
		}
		token, err := os.ReadFile(os.Args[3])
		if err != nil {
			return err
		}
		p = endpointcreds.New(os.Args[2], func(o *endpointcreds.Options) {
			o.AuthorizationToken = string(token)
		})
	default:
		return fmt.Errorf("unknown provider %q", os.Args[1])
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := p.Retrieve(ctx)
	if err != nil {
		return err
	}
	out["Source"] = c.Source
	out["AccessKeyId"] = c.AccessKeyID
	out["SecretAccessKey"] = c.SecretAccessKey
	out["Token"] = c.SessionToken
	out["CanExpire"] = c.CanExpire
	out["ExpiresUnix"] = c.Expires.Unix()
	return nil
}
